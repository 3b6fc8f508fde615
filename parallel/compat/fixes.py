"""Fixes for megatron-core bugs that hit ShardForge on every device.

Applied once per process by `apply_fixes` (from `init_distributed`), after the installed
megatron-core is checked against the versions they were verified for. Each wraps the upstream
function and delegates to it where it can, and names the failure it removes; its test in
tests/unit/test_compat.py reproduces that failure on the unpatched function, so the day upstream
fixes it the test says the patch can go.
"""
from __future__ import annotations

from typing import Any

import torch

from parallel.compat.patching import Patches
from parallel.compat.version import check_megatron_version

_patches: Patches | None = None
# tp x cp when the MoE routers see 1/(tp x cp) of the tokens the LM loss counts (see below); else 1.
_moe_aux_loss_factor = 1.0


def apply_fixes() -> None:
    """Install every fix below, once per process."""
    global _patches
    if _patches is not None:
        return
    check_megatron_version()
    patches = Patches()
    for fix in (fully_reshardable_load_skips_step, moe_aux_loss_scale_under_sequence_parallel,
                router_gemm_without_te, foreach_grad_norm_and_scale, output_discarding_recompute_without_fp8,
                tp_group_default_without_warning, offloaded_fp32_shards_are_leaves,
                offloaded_optimizer_state_without_classes, offloaded_fp32_params_load):
        fix(patches)
    _patches = patches


def set_moe_aux_loss_factor(config: Any, scale: float = 1.0) -> None:
    """Scale the MoE aux / z-loss gradients of the model built from this TransformerConfig; `scale`
    multiplies the factor (a loss normalised by another count than the loss tokens: the engine's)."""
    global _moe_aux_loss_factor
    factor = scale
    if config.calculate_per_token_loss:
        if config.sequence_parallel:
            factor *= config.tensor_model_parallel_size
        factor *= getattr(config, "context_parallel_size", 1)
    _moe_aux_loss_factor = float(factor)


def fully_reshardable_load_skips_step(patches: Patches) -> None:
    # Without apex/TE the distributed optimizer wraps torch AdamW, whose per-param state has a
    # 'step' entry. Loading a 'fully_reshardable' checkpoint (the format that reshards across
    # TP/PP/DP) copies every state key from the loaded tensors, which lack 'step':
    # "KeyError: 'step'" in _set_main_param_and_optimizer_states. Keys the checkpoint lacks keep
    # their value; the step counter is restored by MegatronEngine.load from the saved iteration.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            tensors = {**self.optimizer.state[main_param], **tensors}
        return original(self, model_param, tensors)

    patches.set(DistributedOptimizer, "_set_main_param_and_optimizer_states", _set_main_param_and_optimizer_states)


def moe_aux_loss_scale_under_sequence_parallel(patches: Patches) -> None:
    # With calculate_per_token_loss the routers multiply the aux / z loss by the number of tokens
    # *this rank* routed, and finalize_model_grads divides every gradient by the global count of
    # loss tokens. Under sequence parallel a TP rank routes only 1/tp of the tokens while the LM
    # loss is replicated across TP, so the aux and z-loss gradients come out tp times too small
    # (the ep=2 tp=2 run's grad norm differs from the tp=1 run's; equal with aux loss off).
    # Context parallelism does the same: a CP rank routes 1/cp of each sequence, its aux loss is
    # its share of the sequence's (counts reduced over tp x cp), so the sum over the CP ranks'
    # gradients is the sequence's aux gradient times 1/cp (cp=2 x ep=2 against the single process).
    # The schedule sets the aux-loss backward scale after every forward step: scale it back.
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    original = MoEAuxLossAutoScaler.set_loss_scale

    def set_loss_scale(scale: torch.Tensor) -> None:
        factor = _moe_aux_loss_factor
        original(scale * factor if factor != 1 else scale)

    patches.set(MoEAuxLossAutoScaler, "set_loss_scale", staticmethod(set_loss_scale))


def router_gemm_without_te(patches: Patches) -> None:
    # moe_utils imports te_general_gemm only when TransformerEngine imports and never defines it
    # otherwise, yet the fp32 router GEMM (moe_router_dtype="fp32") tests it by name: every MoE
    # forward in bf16 dies with "NameError: name 'te_general_gemm' is not defined". Define it as
    # absent so the router takes its torch matmul branch.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        patches.set(moe_utils, "te_general_gemm", None)


def foreach_grad_norm_and_scale(patches: Patches) -> None:
    # Without apex/TE, megatron's stand-ins for apex's multi-tensor kernels read every grad's norm
    # on the host: local_multi_tensor_l2_norm builds `torch.tensor([...])` from one norm per grad
    # (a host sync per parameter on a GPU), local_multi_tensor_scale runs two kernels per tensor.
    # torch's foreach ops do the same maths in a few launches with no sync. There is no upstream
    # body to delegate to: apex's kernels are what these stand in for.
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    from parallel.grad_norm import l2_norm as norm_of

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        # On CPU, torch's fp32 norm of a large tensor drifts from the exact value (it feeds the clip
        # coefficient and the grad norm the parity tests compare): accumulate in fp64 there.
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
        patches.set(clip_grads, "l2_norm_impl", l2_norm)
    if clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        patches.set(clip_grads, "multi_tensor_scale_impl", scale)
    if optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        patches.set(optimizer, "multi_tensor_scale_impl", scale)


def output_discarding_recompute_without_fp8(patches: Patches) -> None:
    # CheckpointWithoutOutput (recompute of "layernorm" / "moe_act") sets `self.fp8 = fp8 is not None`
    # with a default of fp8=False, so it always takes its FP8 branch, which needs TransformerEngine:
    # "NameError: name 'FP8GlobalStateManager' is not defined" without it. Only a real fp8 recipe
    # should take that branch.
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    original = CheckpointWithoutOutput.__init__

    def __init__(self, fp8=False, *args, **kwargs):
        original(self, fp8, *args, **kwargs)
        self.fp8 = fp8 not in (None, False)

    patches.set(CheckpointWithoutOutput, "__init__", __init__)


def tp_group_default_without_warning(patches: Patches) -> None:
    # RowParallelLinear passes tp_group=None to its linear function, where
    # get_tensor_model_parallel_group_if_none warns "Warning: tp_group is None, using default tp
    # group. Passing tp_group will be mandatory soon" on every call: under train.compile dynamo
    # cannot trace `warnings.warn` and breaks the layer's graph there (inside attention's offloading
    # context, which breaks it again). Resolve the default group first, then delegate.
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import layers

    original = layers.get_tensor_model_parallel_group_if_none

    def get_tensor_model_parallel_group_if_none(tp_group, is_expert=False, check_initialized=True):
        if tp_group is None and torch.distributed.is_initialized() and ps.is_initialized():
            default = ps.get_expert_tensor_parallel_group if is_expert else ps.get_tensor_model_parallel_group
            tp_group = default(check_initialized=check_initialized)
        return original(tp_group, is_expert, check_initialized)

    patches.set(layers, "get_tensor_model_parallel_group_if_none", get_tensor_model_parallel_group_if_none)


def offloaded_fp32_shards_are_leaves(patches: Patches) -> None:
    # The distributed optimizer's shards of fp32 params are slices of views that autograd tracks
    # (`model_param.view(-1)[start:end]`, not leaves). Its plain path assigns them to the torch
    # optimizer's param groups directly, but under optimizer CPU offload it constructs
    # HybridDeviceOptimizer from them: "ValueError: can't optimize a non-leaf Tensor" for any fp32
    # param. Detached slices of the same memory are leaves; they take the grads and updates alike.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import copy_tensor_model_parallel_attributes

    original = DistributedOptimizer._build_model_and_main_param_groups.__func__

    def _build_model_and_main_param_groups(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        groups = original(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        if not config.optimizer_cpu_offload:
            return groups
        for shards, group_range in zip(groups[3], opt_group_ranges):  # (shard_fp32_groups)
            params = group_range["orig_group"]["params"]
            for i, shard in enumerate(shards):
                if shard.is_leaf:
                    continue
                leaf = shard.detach()
                copy_tensor_model_parallel_attributes(leaf, shard)
                if hasattr(shard, "shared"):
                    leaf.shared = shard.shared
                shards[i] = leaf
                params[next(j for j, p in enumerate(params) if p is shard)] = leaf
        return groups

    patches.set(DistributedOptimizer, "_build_model_and_main_param_groups", classmethod(_build_model_and_main_param_groups))


def offloaded_optimizer_state_without_classes(patches: Patches) -> None:
    # HybridDeviceOptimizer hands its constructor options to torch as param-group defaults, so each
    # param group of its state_dict holds cpu_optimizer_cls and gpu_optimizer_cls (classes). The
    # distributed optimizer saves those groups in the checkpoint's common state, which
    # dist_checkpointing loads with weights_only: "Unsupported global: GLOBAL
    # torch.optim.adamw.AdamW was not an allowed global". The groups are saved without them (the
    # optimizer reads its own attributes, never a loaded group's).
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    original = HybridDeviceOptimizer.state_dict

    def state_dict(self):
        state = original(self)
        state["param_groups"] = [{k: v for k, v in group.items() if not isinstance(v, type)}
                                 for group in state["param_groups"]]
        return state

    patches.set(HybridDeviceOptimizer, "state_dict", state_dict)


def offloaded_fp32_params_load(patches: Patches) -> None:
    # After a load HybridDeviceOptimizer copies each param's loaded `master_param` into that param's
    # fp32 copy, looked up in param_to_fp32_param, which holds only the params that are not fp32:
    # "KeyError: tensor(...)" when an fp32 param's state is loaded. An fp32 param's master is its
    # host copy: the loaded value goes there; the other params go to the upstream method.
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    original = HybridDeviceOptimizer._update_fp32_params_by_new_state

    def _update_fp32_params_by_new_state(self):
        state = self.state
        try:
            self.state = {p: v for p, v in state.items() if p in self.param_to_fp32_param}
            original(self)
        finally:
            self.state = state
        if not self.param_update_in_fp32:
            return
        for param, values in state.items():
            host = self.gpu_params_map_cpu_copy.get(param)
            if param not in self.param_to_fp32_param and host is not None and values["master_param"] is not host:
                host.data.copy_(values["master_param"])

    patches.set(HybridDeviceOptimizer, "_update_fp32_params_by_new_state", _update_fp32_params_by_new_state)
