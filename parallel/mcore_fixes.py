"""Fixes for megatron-core 0.16.1 bugs that hit ShardForge on every device (not CPU specific).

Applied once in `init_distributed`. Each fix names the failure it removes; delete it when the
pinned megatron-core carries the fix.
"""
from __future__ import annotations

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _fully_reshardable_load_skips_step()
    _moe_aux_loss_scale_under_sequence_parallel()
    _router_gemm_without_te()
    _foreach_grad_norm_and_scale()
    _output_discarding_recompute_without_fp8()
    _applied = True


def _fully_reshardable_load_skips_step() -> None:
    # Without apex/TE the distributed optimizer wraps torch AdamW, whose per-param state has a
    # 'step' entry. Loading a 'fully_reshardable' checkpoint (the format that reshards across
    # TP/PP/DP) copies every state key from the loaded tensors, which skip 'step':
    # "KeyError: 'step'" in _set_main_param_and_optimizer_states. Copy what was loaded; the step
    # counter is restored by launcher.checkpoint from the saved iteration.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        for key, tensor in tensors.items():
            destinations[key].copy_(tensor)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


# Set by the engine: TP size when the model is MoE, sequence parallel and per-token loss; else 1.
moe_aux_loss_tp_factor = 1.0


def _moe_aux_loss_scale_under_sequence_parallel() -> None:
    # With calculate_per_token_loss the routers multiply the aux / z loss by the number of tokens
    # *this rank* routed, and finalize_model_grads divides every gradient by the global count of
    # loss tokens. Under sequence parallel a TP rank routes only 1/tp of the tokens while the LM
    # loss is replicated across TP, so the aux and z-loss gradients come out tp times too small
    # (mixtral_tiny ep=2 tp=2: step-1 grad norm 4e-4 off the tp=1 run; exact with aux loss off).
    # The schedule sets the aux-loss backward scale after every forward step: scale it back.
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    original = MoEAuxLossAutoScaler.set_loss_scale

    def set_loss_scale(scale):
        original(scale * moe_aux_loss_tp_factor if moe_aux_loss_tp_factor != 1 else scale)

    MoEAuxLossAutoScaler.set_loss_scale = staticmethod(set_loss_scale)


def _router_gemm_without_te() -> None:
    # moe_utils imports te_general_gemm only when TransformerEngine imports and never defines it
    # otherwise, yet the fp32 router GEMM (moe_router_dtype="fp32") tests it by name: every MoE
    # forward in bf16 dies with "NameError: name 'te_general_gemm' is not defined". Define it as
    # absent so the router takes its torch matmul branch.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _foreach_grad_norm_and_scale() -> None:
    # Without apex/TE, megatron's stand-ins for apex's multi-tensor kernels cost a host sync per
    # parameter: the grad-norm one builds `torch.tensor([...])` from one GPU norm per grad
    # (1060 syncs a step on a 128-expert MoE, 11 ms of its step on an H100), the scale one runs
    # two kernels per tensor. torch's foreach ops do the same maths in a few launches, no sync.
    import torch
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    from parallel.grad_norm import l2_norm as norm_of

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        # On CPU, torch's fp32 norm of a large tensor drifts ~6e-6 from the exact value (it feeds
        # the clip coefficient and the grad norm the parity tests compare): accumulate in fp64 there.
        norms = [norm_of(tensors, torch.float64 if tensors[0].is_cpu else torch.float32)
                 for tensors in tensor_lists if tensors]
        total = torch.linalg.vector_norm(torch.stack(norms)).float() if norms else torch.zeros(())
        return total.reshape(1), None

    def scale(chunk_size, noop_flag, tensor_lists, factor):
        src, dst = tensor_lists
        if src is dst or all(a is b for a, b in zip(src, dst)):
            torch._foreach_mul_(dst, factor)
        else:
            torch._foreach_copy_(dst, src if factor == 1.0 else torch._foreach_mul(src, factor))

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm
    for module in (clip_grads, optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale


def _output_discarding_recompute_without_fp8() -> None:
    # CheckpointWithoutOutput (recompute of "layernorm" / "moe_act") sets `self.fp8 = fp8 is not None`
    # with a default of fp8=False, so it always takes its FP8 branch, which needs TransformerEngine:
    # "NameError: name 'FP8GlobalStateManager' is not defined" without it. Only a real fp8 recipe
    # should take that branch.
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    original = CheckpointWithoutOutput.__init__

    def __init__(self, fp8=False):
        original(self, fp8)
        self.fp8 = fp8 not in (None, False)

    CheckpointWithoutOutput.__init__ = __init__
