"""ShardForge's kernels handed to megatron-core under the names of the apex / TransformerEngine
extensions it looks for (neither is installed)."""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator

import torch

from parallel.compat.patching import Patches
from parallel.compat.version import check_megatron_version

WgradGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def provide_fused_weight_gradient(accum_fp32: WgradGemm, accum_fp16: WgradGemm) -> None:
    """Serve megatron's gradient_accumulation_fusion with these wgrad GEMMs when apex is missing.

    Without apex's `fused_weight_gradient_mlp_cuda`, building a linear with the fusion on fails:
    "RuntimeError: ColumnParallelLinear was called with gradient_accumulation_fusion set to True
    but the custom CUDA extension fused_weight_gradient_mlp_cuda module is not found". The layers
    call the extension's two functions by these names, so a namespace of ours stands in for it."""
    from megatron.core.tensor_parallel import layers

    check_megatron_version()
    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
            wgrad_gemm_accum_fp32=accum_fp32, wgrad_gemm_accum_fp16=accum_fp16)
        layers._grad_accum_fusion_available = True


@contextlib.contextmanager
def te_fused_adam(adam: Callable[..., torch.optim.Optimizer]) -> Iterator[None]:
    """Inside this block megatron-core builds its Adam from `adam` as it would TE's FusedAdam.

    Without TE, megatron's precision-aware optimizer asks TE's version first: "TypeError: '>='
    not supported between instances of 'NoneType' and 'Version'" (is_te_min_version), then hands
    TE's arguments (exp_avg_dtype, master_weights, ...) to its fallback, torch AdamW
    (USING_PYTORCH_OPTIMIZER). megatron picks the class and its arguments by these module names;
    they are restored on exit."""
    import megatron.core.optimizer as mcore_optimizer

    check_megatron_version()
    patches = Patches()
    patches.set(mcore_optimizer, "Adam", adam)
    patches.set(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    patches.set(mcore_optimizer, "is_te_min_version", lambda *args, **kwargs: False)  # TE's version: none
    try:
        yield
    finally:
        patches.restore()
