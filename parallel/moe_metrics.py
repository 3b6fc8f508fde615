"""Per-step MoE metrics: auxiliary losses and per-expert token load, reduced over the world.

Loads come from a forward hook on every megatron TopKRouter (its routing map, after any
token dropping); aux/z losses from megatron's own layer-wise tracker (moe_utils), which the
routers fill during forward. Both are summed over all ranks in one all-reduce at the end of
the step, so every rank, rank 0 included, holds the global numbers:
- tokens are disjoint across DP/EP ranks, across TP ranks (MoE under TP runs sequence
  parallel, each TP rank routes its slice of the sequence), across CP ranks (each holds its
  share of the sequence) and layers across PP stages;
- the tracked load-balancing loss of a TP or CP rank is its partial share (counts are reduced
  over TP x CP inside the router), so the sum over TP x CP is the layer's loss; DP replicas are
  averaged;
- the tracked z-loss is a per-rank mean over its tokens: averaged over TP, CP and DP.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.moe.router import TopKRouter

from models.args import ModelArgs

# megatron's tracker name -> metrics.jsonl key
_LOSS_NAMES = {"load_balancing_loss": "moe_aux_loss", "seq_load_balancing_loss": "moe_seq_aux_loss",
               "z_loss": "moe_z_loss"}


class MoEStats:
    def __init__(self, modules: list[torch.nn.Module], args: ModelArgs, device: torch.device):
        self.args, self.device = args, device
        self.moe_layers = [i for i, moe in enumerate(args.moe_layer_pattern()) if moe]
        self.loss_names = [name for name, on in (
            ("load_balancing_loss", args.moe_router_load_balancing_type == "aux_loss" and args.moe_aux_loss_coeff > 0),
            ("seq_load_balancing_loss",
             args.moe_router_load_balancing_type == "seq_aux_loss" and args.moe_aux_loss_coeff > 0),
            ("z_loss", bool(args.moe_z_loss_coeff))) if on]
        # [layer, expert] tokens routed this step, and [layer] token-slots asked for (tokens x top-k).
        self.load = torch.zeros(args.num_layers, args.num_experts, dtype=torch.float64, device=device)
        self.asked = torch.zeros(args.num_layers, dtype=torch.float64, device=device)
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, TopKRouter):
                    sub.register_forward_hook(self._count)

    def _count(self, router: TopKRouter, inputs, output) -> None:
        # Full activation recompute runs the forward twice, once without grad: count the one
        # with grad (megatron's expert-bias token counts follow the same rule).
        if not torch.is_grad_enabled():
            return
        _, routing_map = output
        layer = router.layer_number - 1
        self.load[layer] += routing_map.sum(dim=0).to(self.load)
        self.asked[layer] += routing_map.shape[0] * self.args.moe_router_topk

    def step_metrics(self, num_microbatches: int) -> dict[str, float]:
        """Reduce this step's numbers over the world (a collective: every rank calls it), reset."""
        tracker = get_moe_layer_wise_logging_tracker()
        losses = torch.stack([tracker[name]["values"].to(self.load) if name in tracker
                              else torch.zeros(self.args.num_layers, dtype=self.load.dtype, device=self.device)
                              for name in self.loss_names]) if self.loss_names else self.load.new_zeros(0, 0)
        flat = torch.cat([self.load.flatten(), self.asked, losses.flatten()])
        dist.all_reduce(flat)
        layers, experts = self.args.num_layers, self.args.num_experts
        load = flat[:layers * experts].view(layers, experts)[self.moe_layers]
        asked = flat[layers * experts:layers * (experts + 1)][self.moe_layers]
        losses = flat[layers * (experts + 1):].view(len(self.loss_names), layers)[:, self.moe_layers]
        self.load.zero_()
        self.asked.zero_()
        clear_aux_losses_tracker()

        mean = load.mean(dim=1)
        out = {
            # per MoE layer over experts, then averaged over MoE layers
            "moe_load_min": load.min(dim=1).values.mean().item(),
            "moe_load_max": load.max(dim=1).values.mean().item(),
            "moe_load_mean": mean.mean().item(),
            "moe_imbalance": (load.max(dim=1).values / mean.clamp(min=1)).mean().item(),
            "moe_imbalance_worst_layer": (load.max(dim=1).values / mean.clamp(min=1)).max().item(),
        }
        if self.args.moe_expert_capacity_factor is not None:
            out["moe_dropped_fraction"] = (1 - load.sum() / asked.sum().clamp(min=1)).item()
        dp = ps.get_data_parallel_world_size()
        tp_cp = ps.get_tensor_model_parallel_world_size() * ps.get_context_parallel_world_size()
        for name, values in zip(self.loss_names, losses):
            replicas = dp * tp_cp if name == "z_loss" else dp
            # per micro batch, averaged over MoE layers (megatron's logging convention)
            out[_LOSS_NAMES[name]] = (values.sum() / replicas / num_microbatches / len(self.moe_layers)).item()
        return out
