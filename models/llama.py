"""Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA; Qwen2 qkv bias, Qwen3 qk-norm) as a
megatron-core GPTModel. One model chunk per (pipeline stage, virtual stage)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from models.args import ModelArgs
from models.kernel_provider import KernelOptions, decoder_block_spec, model_class

def _skip_init(weight: torch.Tensor) -> None:
    pass


def moe_config_kwargs(args: ModelArgs, *, tp: int, ep: int) -> dict[str, Any]:
    """TransformerConfig fields of an MoE model (empty for a dense one)."""
    if not args.is_moe:
        return {}
    return dict(
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        moe_layer_freq=args.moe_layer_freq if isinstance(args.moe_layer_freq, int) else list(args.moe_layer_freq),
        moe_router_score_function=args.moe_router_score_function,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_router_num_groups=args.moe_router_num_groups, moe_router_group_topk=args.moe_router_group_topk,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        # Routing decisions in bf16 flip between layouts and runs; megatron recommends fp32.
        moe_router_dtype="fp32",
        # megatron's grouped GEMM needs TransformerEngine or grouped_gemm; the torch backend has its
        # own (models/kernels/grouped_experts.py) behind SequentialMLP's parameters.
        moe_grouped_gemm=False,
        expert_model_parallel_size=ep,
        # Experts are split over the same TP ranks as attention (megatron's default ETP = TP).
        expert_tensor_parallel_size=tp,
        # MoELayer refuses to train under TP without sequence parallel.
        sequence_parallel=tp > 1,
    )


def transformer_config(args: ModelArgs, *, tp: int, pp: int, vpp: int | None, params_dtype: torch.dtype,
                       on_cpu: bool, recompute: str | list[str] | None, ep: int = 1, cp: int = 1) -> TransformerConfig:
    bf16 = params_dtype == torch.bfloat16
    recompute_kw: dict[str, Any] = {}
    ours: list[str] = []  # mlp_act (models/mlp_act_recompute.py): added after megatron validated its own names
    if recompute == "full":
        recompute_kw = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        recompute_kw = dict(recompute_granularity="selective")  # megatron's default: core attention
    elif recompute is not None:  # selective, these submodules (e.g. ["mlp", "layernorm"])
        ours = [m for m in recompute if m == "mlp_act"]
        recompute_kw = dict(recompute_granularity="selective", recompute_modules=[m for m in recompute if m not in ours])
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization="RMSNorm", layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=args.init_method_std,
        # Weights are set by models.init.init_weights from the global tensors, layout-independently.
        # megatron's init pass still runs (it tags TP-sharded params, which grad-norm and
        # checkpointing rely on) but draws nothing.
        init_method=_skip_init, output_layer_init_method=_skip_init, embedding_init_method=_skip_init,
        use_cpu_initialization=on_cpu,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=bf16,
        # SwiGLU without bias: megatron's jit-fused swiglu pays on GPU; plain path on CPU.
        bias_activation_fusion=not on_cpu,
        # megatron's native fused cross entropy (one compiled kernel instead of ~10 fp32 passes over
        # the [tokens, vocab] logits); the unfused one on CPU, where compiling would cost more.
        cross_entropy_loss_fusion=not on_cpu, cross_entropy_fusion_impl="native",
        # Token-weighted loss over the whole global batch (exact under any DP / micro-batching).
        calculate_per_token_loss=True,
        # Batched p2p gave a silently different loss with interleaved PP on gloo.
        batch_p2p_comm=False,
        deallocate_pipeline_outputs=True,
        **recompute_kw,
        **moe_config_kwargs(args, tp=tp, ep=ep),
    )
    config.recompute_modules += ours
    return config


def build_llama(args: ModelArgs, config: TransformerConfig, options: KernelOptions = KernelOptions(), *,
                pre_process: bool, post_process: bool, vp_stage: int | None = None) -> GPTModel:
    """One model chunk: megatron-core's GPTModel with the classes models/kernel_provider.py names
    for `options`."""
    kw = {"vp_stage": vp_stage} if vp_stage is not None else {}
    return model_class(config, options)(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, options, vp_stage),
        vocab_size=args.padded_vocab_size,
        unpadded_vocab_size=args.vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=args.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(args.rotary_base),
        rope_scaling=args.rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        **kw,
    )
