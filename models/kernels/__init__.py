"""Kernel leaves: autograd Functions, Modules and torch.library ops; none patches a library."""

# The dense core attention's SDPA kernels on CUDA (`train.attention_backend`; models/kernels/attention.py).
# Here, not there, so that config validation names them without importing megatron-core.
ATTENTION_BACKENDS = ("auto", "cudnn", "flash")
