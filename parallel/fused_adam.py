"""AdamW for megatron-core's precision-aware distributed optimizer, without TransformerEngine.

With `use_precision_aware_optimizer`, megatron-core's distributed optimizer gives the inner
optimizer the bf16 parameter shards themselves, with the fp32 main grads as `decoupled_grad`,
and leaves the master weights to it. TE's FusedAdam fills that role where TE is installed;
`FusedAdam` here is the part of its interface megatron calls, on one Triton kernel (CUDA) or
the same arithmetic in torch ops (CPU):

* master weights as 16-bit remainders (TE's `store_param_remainders`): the bf16 parameter is
  the fp32 master weight rounded to nearest, the int16 `master_param` state its low 16 bits, so
  the fp32 master weight is exact at 2 bytes per parameter instead of 4;
* `exp_avg` / `exp_avg_sq` in fp32 or bf16;
* `grad_scale`: a 0-dim tensor every grad is divided by inside the step (parallel/grad_scaling.py);
* or, with `stochastic_rounding` (`optim.master_weights=stochastic`), no master weights at all: the
  updated fp32 value is rounded to one of its two bf16 neighbours with probability by distance,
  so the bf16 param is the master weight's unbiased estimate (updates far below a bf16 ulp still
  move it on average) at 0 bytes per parameter, the memory of pure-bf16 training.

One pass reads 12 bytes per parameter and writes 8 (bf16 moments; 16 and 12 with fp32), where
torch AdamW over fp32 master weights, followed by megatron's copy into the bf16 params, moves 34.
Checkpoints hold the fp32 master weights and moments (`get_unscaled_state`), the same tensors as
the fp32-master optimizer's, so a run may switch between the two on resume.
"""
from __future__ import annotations

import functools
import math
from typing import Any, ContextManager

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below
    triton = None


def join_master(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """fp32 master weights from bf16 params (rounded to nearest) and their int16 remainders."""
    rem = remainder.to(torch.int32)
    high = param.view(torch.int16).to(torch.int32) - (rem < 0).to(torch.int32)  # undo the round-up
    return ((high << 16) | (rem & 0xFFFF)).view(torch.float32)


# The noise of stochastic rounding: a 32-bit integer hash of (element index + seed) (Wellons'
# "lowbias32"). Here in int64 masked to 32 bits, 0x846CA68B as its negative residue so no
# product leaves int64; the kernel's uint32 wraps by itself. Cheap next to Philox (tl.randint
# made the AdamW pass compute-bound instead of bound by its memory traffic), and the same in Triton and torch.
_MASK, _MUL1, _MUL2 = 0xFFFFFFFF, 0x7FEB352D, 0x846CA68B - (1 << 32)


def rounding_noise(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 in [0, 2**16) for elements 0..n-1 of a tensor stepped with `seed`."""
    x = (torch.arange(n, dtype=torch.int64, device=device) + seed) & _MASK
    x ^= x >> 16
    x = (x * _MUL1) & _MASK
    x ^= x >> 15
    x = (x * _MUL2) & _MASK
    x ^= x >> 16
    return (x & 0xFFFF).to(torch.int32)


def stochastic_round(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability (distance to the lower neighbour) / ulp:
    `noise` (int32, uniform in [0, 2**16)) is added to the 16 bits bf16 drops, which carries
    into the kept bits exactly that often. On the bit pattern, so it holds for either sign."""
    bits = x.contiguous().view(torch.int32) + noise
    return ((bits >> 16).to(torch.int16)).view(torch.bfloat16)


def split_master(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 master weights -> (bf16 rounded to nearest, int16 low halves). A low half >= 0x8000
    rounds the bf16 up, and reads as a negative int16: `join_master` takes the 1 back off."""
    bits = master.contiguous().view(torch.int32)
    low = bits & 0xFFFF
    high = (bits >> 16) + (low >= 0x8000).to(torch.int32)
    as_int16 = lambda x: (((x & 0xFFFF) ^ 0x8000) - 0x8000).to(torch.int16)  # two's complement of 16 bits
    return as_int16(high).view(torch.bfloat16), as_int16(low)


if triton is not None:
    @triton.jit(do_not_specialize=["seed"])
    def _adamw_kernel(param_ptr, rem_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, scale_ptr, n, seed,
                      lr, beta1, beta2, eps, decay, bias_correction1, bias_correction2_sqrt,
                      STOCHASTIC: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        """STOCHASTIC: no remainders (rem_ptr unused), the param rounded with noise from `seed`."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if STOCHASTIC:
            p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
        else:
            rem = tl.load(rem_ptr + offs, mask=mask).to(tl.int32)
            high = tl.load(param_ptr + offs, mask=mask).to(tl.int16, bitcast=True).to(tl.int32)
            high = high - (rem < 0).to(tl.int32)
            p = ((high << 16) | (rem & 0xFFFF)).to(tl.float32, bitcast=True)
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        if HAS_SCALE:
            g = g / tl.load(scale_ptr)
        m = tl.load(exp_avg_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask).to(tl.float32)
        p = p * (1.0 - lr * decay)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - (lr / bias_correction1) * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        tl.store(exp_avg_ptr + offs, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
        bits = p.to(tl.int32, bitcast=True)
        if STOCHASTIC:
            # rounding_noise (above) in uint32, whose products wrap mod 2**32 by themselves
            x = (offs + seed).to(tl.uint32)
            x = x ^ (x >> 16)
            x = x * tl.full([BLOCK], 0x7FEB352D, tl.uint32)
            x = x ^ (x >> 15)
            x = x * tl.full([BLOCK], 0x846CA68B, tl.uint32)
            x = x ^ (x >> 16)
            high = (bits + (x & 0xFFFF).to(tl.int32)) >> 16
        else:
            low = bits & 0xFFFF
            high = (bits >> 16) + (low >= 0x8000).to(tl.int32)
            tl.store(rem_ptr + offs, low.to(tl.int16), mask=mask)
        tl.store(param_ptr + offs, high.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)


def _step_torch(p: torch.Tensor, rem: torch.Tensor | None, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                scale: torch.Tensor | None, lr: float, beta1: float, beta2: float, eps: float, decay: float,
                bias_correction1: float, bias_correction2_sqrt: float, seed: int = 0) -> None:
    """The kernel's arithmetic in torch ops (CPU, and GPUs without Triton); `rem` None: stochastic
    rounding with noise from `seed`."""
    master = join_master(p, rem) if rem is not None else p.float()
    g = g.float() / scale if scale is not None else g.float()
    m32 = m.float().mul_(beta1).add_(g, alpha=1.0 - beta1)
    v32 = v.float().mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    master.mul_(1.0 - lr * decay)
    master.addcdiv_(m32, v32.sqrt().div_(bias_correction2_sqrt).add_(eps), value=-lr / bias_correction1)
    m.copy_(m32)
    v.copy_(v32)
    if rem is None:
        p.copy_(stochastic_round(master, rounding_noise(p.numel(), seed, p.device).view(p.shape)))
        return
    high, low = split_master(master)
    p.copy_(high)
    rem.copy_(low)


class FusedAdam(torch.optim.AdamW):
    """AdamW (decoupled weight decay) over bf16 params with remainder master weights; the
    constructor takes what megatron-core passes TE's FusedAdam. A subclass of torch's AdamW only
    for megatron's type checks; `step` is its own. `fused` is set, as for torch's fused AdamW: one
    kernel per tensor that divides the grads by `grad_scale` (parallel/grad_scaling.py)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, adam_w_mode: bool = True, exp_avg_dtype: torch.dtype = torch.float32,
                 exp_avg_sq_dtype: torch.dtype = torch.float32, master_weights: bool = True,
                 use_decoupled_grad: bool = True, master_weight_dtype: torch.dtype = torch.float32,
                 store_param_remainders: bool = True, stochastic_rounding: bool = False, seed: int = 0):
        if not (adam_w_mode and master_weights and store_param_remainders and master_weight_dtype == torch.float32):
            raise ValueError("FusedAdam supports AdamW with fp32 master weights kept as bf16 remainders only")
        # Stochastic rounding keeps no master weights: the "master_param" state megatron reads and
        # writes is the bf16 param itself (the same tensor), in fp32 when read.
        self.stochastic_rounding, self.seed = stochastic_rounding, seed
        self.exp_avg_dtype, self.exp_avg_sq_dtype = exp_avg_dtype, exp_avg_sq_dtype
        self.use_decoupled_grad = use_decoupled_grad
        self.grad_scale: torch.Tensor | None = None
        torch.optim.Optimizer.__init__(self, params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False,
            foreach=False, fused=True, capturable=False, differentiable=False, decoupled_weight_decay=True))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"FusedAdam keeps master weights as remainders of bf16 params, got {p.dtype}")

    def initialize_state(self, p: torch.Tensor) -> None:
        """Zero moments, master weight = the bf16 param (remainder 0), step 0."""
        self.state[p].update(exp_avg=torch.zeros_like(p, dtype=self.exp_avg_dtype),
                             exp_avg_sq=torch.zeros_like(p, dtype=self.exp_avg_sq_dtype),
                             master_param=p if self.stochastic_rounding else torch.zeros_like(p, dtype=torch.int16),
                             step=torch.tensor(0.0))  # on the host: bias corrections without a sync

    def get_unscaled_state(self, p: torch.Tensor, key: str) -> torch.Tensor:
        """A state in fp32 (the master weight joined from its halves); what checkpoints store."""
        value = self.state[p][key]
        if key == "master_param":
            return p.detach().float() if self.stochastic_rounding else join_master(p.detach(), value)
        return value if key == "step" else value.float()

    def set_scaled_state(self, p: torch.Tensor, key: str, value: torch.Tensor) -> None:
        if not self.state[p]:
            self.initialize_state(p)
        state = self.state[p]
        if key == "master_param" and self.stochastic_rounding:
            p.data.copy_(value.to(device=p.device).view_as(p))  # to nearest: a loaded master rounds once
        elif key == "master_param":  # the bf16 param is the master weight's rounding: both change
            high, low = split_master(value.to(device=p.device, dtype=torch.float32).view_as(p))
            p.data.copy_(high)
            state["master_param"].copy_(low)
        elif key == "step":
            state["step"] = value.detach().float().cpu().clone()
        else:
            state[key].copy_(value.view_as(p))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating states to the param's dtype (bf16) on load: restore the moments' dtypes.
        for p, state in self.state.items():
            if self.stochastic_rounding and "master_param" in state:
                state["master_param"] = p  # torch's load made it a copy
            for key, dtype in (("exp_avg", self.exp_avg_dtype), ("exp_avg_sq", self.exp_avg_sq_dtype)):
                if key in state:
                    state[key] = state[key].to(dtype)
            if "step" in state:
                state["step"] = state["step"].float().cpu().clone()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None, "FusedAdam takes no closure"
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                grad = getattr(p, "decoupled_grad", None) if self.use_decoupled_grad else None
                if grad is None:  # megatron's dummy step before a checkpoint load sets .grad
                    grad = p.grad
                if grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self.initialize_state(p)
                # A new host tensor: a loaded checkpoint may share one step tensor among params or put it
                # on the device (MegatronEngine.load, for fused optimizers); the host keeps the count.
                t = float(state["step"]) + 1
                state["step"] = torch.tensor(t)
                args = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                        1.0 - beta1 ** t, math.sqrt(1.0 - beta2 ** t))
                rem, seed = state["master_param"], 0
                if self.stochastic_rounding:  # no remainders; a fresh noise stream per (seed, rank, param, step)
                    rem, seed = None, hash((self.seed, rank, index, int(t))) & 0x7FFFFFFF
                tensors = (grad, state["exp_avg"], state["exp_avg_sq"])
                if triton is not None and p.is_cuda:
                    block = 4096
                    scale = self.grad_scale if self.grad_scale is not None else grad  # (unread without)
                    _adamw_kernel[(triton.cdiv(p.numel(), block),)](
                        p, p if rem is None else rem, *tensors, scale, p.numel(), seed, *args,
                        STOCHASTIC=rem is None, HAS_SCALE=self.grad_scale is not None, BLOCK=block, num_warps=8)
                else:
                    _step_torch(p, rem, *tensors, self.grad_scale, *args, seed=seed)


def as_megatron_adam(stochastic_rounding: bool = False, seed: int = 0) -> ContextManager[None]:
    """Inside this block megatron-core builds its precision-aware optimizer from FusedAdam where
    it would take TE's (parallel/compat)."""
    from parallel import compat

    return compat.te_fused_adam(functools.partial(FusedAdam, stochastic_rounding=stochastic_rounding, seed=seed))


def precision_aware(config: Any, moments_dtype: torch.dtype, main_grads_dtype: torch.dtype = torch.float32) -> Any:
    """Switch a megatron OptimizerConfig to the precision-aware path. Set after construction:
    its __post_init__ insists on TE's FusedAdam for this path."""
    config.use_precision_aware_optimizer = True
    config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 = True
    config.store_param_remainders = True
    config.exp_avg_dtype = config.exp_avg_sq_dtype = moments_dtype
    config.main_grads_dtype = main_grads_dtype  # (the grad buffer's dtype itself is DDP's grad_reduce_in_fp32)
    return config
