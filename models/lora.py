"""LoRA on the transformer layers' linears: what a run adapts, and the adapters' names and math.

A LoRA linear (models/kernels/lora_linear.py) keeps its base weight W frozen and adds
`scale * B @ A` to it, A [rank, in], B [out, rank], scale = alpha / rank (Hugging Face PEFT's
convention, so exported adapters load there unchanged). B starts at zero, so a fresh adapter
leaves the model as it was.

`targets` name the linears: qkv (the fused query/key/value projection), proj (the attention
output), fc1 (the fused gate/up projection), fc2 (the MLP output) of dense MLPs and shared experts,
experts (both linears of every routed expert of a mixture-of-experts layer).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

TARGETS = ("qkv", "proj", "fc1", "fc2", "experts")
DENSE_TARGETS = TARGETS[:4]
# target -> the module path of its linear inside a dense transformer layer
TARGET_MODULES = {"qkv": "self_attention.linear_qkv", "proj": "self_attention.linear_proj",
                  "fc1": "mlp.linear_fc1", "fc2": "mlp.linear_fc2"}
ADAPTER_PARAMS = ("lora_a", "lora_b")


@dataclass(frozen=True)
class LoraOptions:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    base_fp8: bool = False  # the adapted linears' frozen weights held in fp8, dequantised in each GEMM

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def is_adapter(name: str) -> bool:
    """Whether a parameter name (module or checkpoint key) is a LoRA factor."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def freeze_base(model: torch.nn.Module) -> None:
    """Only the adapters train: every other parameter gets no gradient, and so no optimizer state."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


@contextmanager
def adapters_off(models: list[torch.nn.Module]) -> Iterator[None]:
    """The LoRA linears of `models` compute their base alone inside the block."""
    linears = [m for model in models for m in model.modules() if isinstance(getattr(m, "lora", None), LoraOptions)]
    for linear in linears:
        linear.adapter_on = False
    try:
        yield
    finally:
        for linear in linears:
            linear.adapter_on = True


def merge_into_base(model: torch.nn.Module) -> None:
    """Every LoRA linear of `model` with its adapter merged into its weight (`merged`); the adapters
    are left as they are."""
    with torch.no_grad():
        for module in model.modules():
            lora = getattr(module, "lora", None)
            if isinstance(lora, LoraOptions):
                module.weight.copy_(merged(module.weight, module.lora_a, module.lora_b, lora.scale))


def merged(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A, computed in fp32, in W's dtype."""
    return (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def embeddings_require_grad(model: torch.nn.Module) -> None:
    """Mark the embedding output (first pipeline stage) as requiring grad. With the whole base frozen
    nothing before the first adapter does, and a reentrant recompute (a layer, or its MLP) whose
    inputs need no gradient runs no backward: the adapters inside would get none."""
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        embedding.register_forward_hook(lambda module, args, output: output.requires_grad_())
