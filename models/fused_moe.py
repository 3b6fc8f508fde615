"""The MoE layer of one expert-parallel rank without host synchronization (torch backend, CUDA).

megatron-core's MoELayer without TransformerEngine permutes the routed tokens with
`masked_select` and copies the tokens per expert to the host before the expert GEMMs: the host
waits for the GPU twice per layer and direction. Where every token keeps its top-k experts
(dropless), with one expert-parallel and tensor-parallel rank, this layer runs the same router,
then models/kernels/moe_permute.py's permute, GroupedGemmExperts' grouped GEMMs with device
offsets, and a combine that applies the router probabilities while it sums each token's expert
outputs. Any other case (several ranks, token dropping or padding, probabilities on the input,
activation recompute inside the experts, shared-expert overlap, a padding mask, the experts not
on their grouped path) is megatron's forward unchanged, which a CUDA graph cannot capture: under
capture (train.cuda_graph=true) that case is an error naming the setting. Parameters and their
names are MoELayer's.
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.utils import get_pg_size

from models.kernels import moe_permute
from models.kernels.grouped_experts import GroupedGemmExperts


def config_fallbacks(*, num_experts: int, ep: int, tp: int, capacity_factor: float | None, bf16: bool,
                     recompute: str | list[str] | None, grouped_mm: bool) -> list[str]:
    """Why a run's MoE layers would take megatron's forward, read from its config (empty: every
    layer runs the fused path). The config-time form of FusedMoELayer.fused_path for the options a
    ShardForge config can set (fp8 is refused for MoE models by validation); `grouped_mm`: whether the GPU runs torch's grouped GEMM."""
    why = []
    if ep * tp > 1:
        why.append("several expert/tensor-parallel ranks")
    if capacity_factor is not None:
        why.append("token capacity (model.moe_expert_capacity_factor)")
    if num_experts == 1:
        why.append("one expert")
    if not bf16:
        why.append("parameters not in bf16")
    if isinstance(recompute, (list, tuple)) and "moe_act" in recompute:
        why.append("train.recompute with moe_act")
    if not grouped_mm:
        why.append("no grouped GEMM on this GPU (sm90+)")
    return why


class FusedMoELayer(MoELayer):
    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        if intermediate_tensors is not None or padding_mask is not None or not self.fused_path(hidden_states):
            if hidden_states.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("train.cuda_graph=true: this MoE layer runs megatron's dispatcher (several "
                                   "expert/tensor-parallel ranks, token capacity, fp8 experts or another case "
                                   "models/fused_moe.py leaves to it), which reads token counts on the host and "
                                   "cannot be captured; set train.cuda_graph=false")
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        if self.moe_layer_recompute:
            return tensor_parallel.checkpoint(self._fused_forward, False, hidden_states)
        return self._fused_forward(hidden_states)

    def fused_path(self, hidden_states: torch.Tensor) -> bool:
        """Where this forward runs without megatron's dispatcher (config_fallbacks: the same rules
        read from a run's config)."""
        config = self.config
        ranks = get_pg_size(self.ep_group) * get_pg_size(self.attn_tp_group) * config.expert_tensor_parallel_size
        if ranks != 1:
            return False
        if (config.moe_expert_capacity_factor is not None or config.moe_pad_expert_input_to_capacity
                or config.moe_router_padding_for_quantization or config.moe_latent_size
                or self.shared_expert_overlap or config.moe_router_load_balancing_type == "sinkhorn"):
            return False
        if config.recompute_granularity == "selective" and "moe_act" in config.recompute_modules:
            return False
        return isinstance(self.experts, GroupedGemmExperts) and self.experts._grouped_path(hidden_states)

    def _fused_forward(self, hidden_states: torch.Tensor):
        shared = self.shared_experts_compute(hidden_states)
        probs, routing_map = self.route(hidden_states)
        routing = moe_permute.Routing.from_map(probs, routing_map, self.config.moe_router_topk)
        tokens = moe_permute.permute(hidden_states.view(-1, hidden_states.shape[-1]), routing)
        expert_out = self.experts.grouped(tokens, routing.tokens_per_expert)
        output = moe_permute.combine(expert_out, routing).view(hidden_states.shape)
        if shared is not None:
            output = output + shared
        return output, None
