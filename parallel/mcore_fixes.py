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
