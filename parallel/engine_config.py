"""The typed settings an engine takes besides the model shape and the layout: the optimizer's
(`optim.*`) and ZeRO-3's (`parallel.zero.*`). launcher/config/schema.py places them in the Hydra
schema; the defaults here are the ones a run gets."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with megatron-core's lr schedule: linear warmup, then decay to min_lr over the run."""
    lr: float = 3.0e-4                # peak learning rate, reached after warmup_steps
    min_lr: float = 3.0e-5            # learning rate at the last step
    weight_decay: float = 0.1         # decoupled (AdamW); not on biases and norms
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8               # Adam's epsilon
    clip_grad: float = 1.0            # global gradient-norm clip
    warmup_steps: int = 10            # linear warmup from 0 to lr
    decay_style: str = "cosine"       # cosine | linear | constant
    # engine=megatron, bf16: fp32 master weights kept as bf16 params + 16-bit remainders, one fused
    # AdamW pass (parallel/fused_adam.py)
    precision_aware: bool = False
    moments_dtype: str = "fp32"       # fp32 | bf16: Adam's exp_avg and exp_avg_sq (bf16 needs precision_aware)
    # fp32 | bf16: the grad buffer DDP accumulates and reduces in (bf16, like Megatron-LM's
    # --grad-reduce-in-bf16, needs precision_aware or cpu_offload)
    main_grads_dtype: str = "fp32"
    # exact | stochastic (precision_aware only): exact keeps the fp32 masters as 16-bit remainders
    # (2 bytes/param); stochastic keeps none and rounds each bf16 update stochastically
    master_weights: str = "exact"
    # engine=megatron: fp32 master weights and Adam moments held in host memory and stepped
    # there by torch's fused CPU AdamW (megatron-core's HybridDeviceOptimizer); params and grads
    # stay on the GPU. Needs parallel.distributed_optimizer=true
    cpu_offload: bool = False


@dataclass(frozen=True)
class ZeroConfig:
    """engine=deepspeed: ZeRO stage 3 (parameters, gradients and optimizer state sharded over DP)."""
    offload_params: str = "none"      # none | cpu | nvme: where parameter partitions live between uses
    offload_optimizer: str = "none"   # none | cpu | nvme: optimizer state + fp32 masters (cpu: DeepSpeedCPUAdam)
    nvme_path: str | None = None      # a local NVMe directory, required by either offload=nvme
