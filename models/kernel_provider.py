"""The kernel provider: for a run's options, the class that serves every slot of the model.

This is the one place that picks kernels. The model is megatron-core's GPTModel built from the
layer spec returned here; nothing is patched into megatron and nothing is swapped after the build.

`te` backend: megatron-core's TransformerEngine spec (fused norm+linear, TE attention).
`torch` backend, per slot (`slots` lists them for a built spec):
- norms: models/kernels/norm.py RMSNorm (Triton on CUDA tensors, F.rms_norm elsewhere);
- residual adds: ResidualAddNorm, the add fused into the norm reading its sum on CUDA tensors
  (models/residual_norm.py); megatron's bias-dropout-add under full-layer recompute, which
  re-runs one layer alone;
- attention core: SDPA (models/kernels/attention.py; on CUDA the kernel `attention_backend` names,
  or torch's own order); under context parallelism (cp > 1) the
  ring or all-gather CP attention (`cp_mode`, models/kernels/context_parallel_attention.py; packed
  rows: varlen blocks per document); RoPE: on GPU RopeSelfAttention
  (models/rope_attention.py), elsewhere megatron's SelfAttention;
- linears: megatron's, or with `fp8` the fp8 ones (models/kernels/fp8_linear.py; dense models),
  told where their input is held anyway (`keep_input`); with `lora` the linears it targets carry an
  adapter beside their frozen weight (models/kernels/lora_linear.py; routed experts with adapters
  run as megatron's SequentialMLP);
- MLP: on GPU the Triton SwiGLU (models/swiglu_mlp.py), elsewhere megatron's; with `mlp_act`
  recompute (dense models) models/mlp_act_recompute.py; MoE layers: megatron's MoELayer, or on GPU
  with `moe_dispatch=fused` FusedMoELayer (models/fused_moe.py: permute, grouped GEMMs and combine
  without host synchronization where one rank holds every expert); MoE experts:
  GroupedGemmExperts (models/kernels/grouped_experts.py); shared experts like the MLP;
- norm recompute (`layernorm`): on GPU refilled in place (models/norm_recompute.py);
- loss: over the real vocabulary only, the padded rows masked out (models/padded_vocab.py); on GPU
  without tensor parallelism, the output layer fused with cross entropy (models/fused_loss.py);
  elsewhere megatron's cross entropy.
"GPU" kernels are the megatron engine's on CUDA: the DeepSpeed engine keeps megatron's own RoPE,
SwiGLU, norm recompute and loss (ZeRO-3 gathers a weight only for its module's forward; the fused
loss reads the output weight outside it).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.random import CheckpointWithoutOutput
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from models.fused_loss import LinearCrossEntropyGPTModel, LinearTokenLossGPTModel
from models.fused_moe import FusedMoELayer
from models.kernels import ATTENTION_BACKENDS
from models.kernels.attention import SDPAttention
from models.kernels.context_parallel_attention import MODES as CP_MODES, ContextParallelAttention
from models.kernels.fp8_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from models.kernels.grouped_experts import GroupedGemmExperts
from models.kernels.lora_linear import (LoraColumnParallelLinear, LoraFp8ColumnParallelLinear,
                                       LoraFp8RowParallelLinear, LoraRowParallelLinear)
from models.kernels.norm import RMSNorm
from models.lora import LoraOptions
from models.mlp_act_recompute import ActivationRecomputeMLP, TritonActivationRecomputeMLP
from models.norm_recompute import NormOutputCheckpoint
from models.padded_vocab import PaddedVocabGPTModel
from models.residual_norm import ChainedRMSNorm, NormChain, ResidualAddNorm
from models.rope_attention import RopeSelfAttention
from models.swiglu_mlp import TritonSwiGLUMLP, TritonSwiGLUSharedExpertMLP
from models.transformer_layer import LlamaTransformerLayer

BACKENDS = ("torch", "te")
ENGINES = ("megatron", "deepspeed")


@dataclass(frozen=True)
class KernelOptions:
    """What the kernels depend on besides the TransformerConfig (which holds recompute, MoE,
    qk_layernorm and tensor parallelism)."""

    device: str = "cpu"  # where the model runs: cpu | cuda
    backend: str = "torch"  # torch | te
    fp8: bool = False  # fp8 GEMMs in the dense layers' linears (torch backend)
    engine: str = "megatron"  # megatron | deepspeed
    cp_mode: str = "ring"  # context-parallel attention (cp > 1): ring | allgather
    lora: LoraOptions | None = None  # LoRA adapters on the dense layers' linears it targets
    moe_dispatch: str = "fused"  # MoE layers under gpu_kernels: fused (FusedMoELayer) | megatron (MoELayer)
    attention_backend: str = "auto"  # the dense core attention's SDPA kernel on CUDA: auto | cudnn | flash
    # lm | dpo | simpo | orpo: the fused loss slot serves only a loss c·Σ mask·loss_t (one scale for
    # every token), which a preference loss is not
    objective: str = "lm"

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r} (cpu | cuda)")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {self.backend!r} (torch | te)")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r} (megatron | deepspeed)")
        if self.moe_dispatch not in ("fused", "megatron"):
            raise ValueError(f"unknown MoE dispatch {self.moe_dispatch!r} (fused | megatron)")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention_backend!r} ({' | '.join(ATTENTION_BACKENDS)})")
        if self.cp_mode not in CP_MODES:
            raise ValueError(f"unknown context-parallel attention mode {self.cp_mode!r} (ring | allgather)")

    @property
    def gpu_kernels(self) -> bool:
        """The Triton kernels that stand in for megatron's own functions (RoPE, SwiGLU, norm recompute)."""
        return self.device == "cuda" and self.backend == "torch" and self.engine == "megatron"


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return False
    return True


def default_backend() -> str:
    return "te" if transformer_engine_available() else "torch"


def model_class(config: TransformerConfig, options: KernelOptions) -> type[GPTModel]:
    """The loss slot (built with `unpadded_vocab_size=`): the fused output layer + cross entropy has no
    vocab-parallel reduction (TP 1 only); its LM form scales every token's gradient alike, so a
    preference loss (each sequence's tokens weighed by its pair's term) gets the per-token form."""
    if options.device == "cuda" and options.engine == "megatron" and config.tensor_model_parallel_size == 1:
        return LinearCrossEntropyGPTModel if options.objective == "lm" else LinearTokenLossGPTModel
    return PaddedVocabGPTModel


def decoder_block_spec(config: TransformerConfig, options: KernelOptions,
                       vp_stage: int | None) -> ModuleSpec | TransformerBlockSubmodules:
    """The layers of this pipeline (virtual) stage, and its final norm."""
    moe = config.num_moe_experts is not None
    if options.backend == "te":
        if moe:
            return get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    if moe:
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                           vp_stage=vp_stage)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
        block = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage))
    # One chain per model chunk: built with it, it links each residual add to its reader.
    chain = NormChain() if config.recompute_granularity != "full" else None
    for spec in {id(s): s for s in block.layer_specs}.values():  # (megatron repeats one spec object)
        _fill_layer(spec, config, options, chain)
    block.layer_norm = RMSNorm if chain is None else ModuleSpec(module=ChainedRMSNorm, params={"norm_chain": chain})
    return block


def _fill_layer(spec: ModuleSpec, config: TransformerConfig, options: KernelOptions, chain: NormChain | None) -> None:
    """One layer of megatron's local (torch) spec, with this run's classes."""
    gpu = options.gpu_kernels
    layer = spec.submodules
    attention = layer.self_attention.submodules
    recompute = config.recompute_modules if config.recompute_granularity == "selective" else []
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    if config.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    layer.self_attention.module = RopeSelfAttention if gpu else SelfAttention
    attention.core_attention = (ModuleSpec(module=ContextParallelAttention, params={"mode": options.cp_mode})
                                if config.context_parallel_size > 1
                                else ModuleSpec(module=SDPAttention, params={"backend": options.attention_backend}))
    spec.module = LlamaTransformerLayer
    spec.params = dict(spec.params)
    if chain is not None:
        layer.self_attn_bda = layer.mlp_bda = ResidualAddNorm
        spec.params["norm_chain"] = chain
    if gpu and "layernorm" in recompute:
        spec.params["norm_checkpoint"] = NormOutputCheckpoint

    mlp = layer.mlp
    if mlp.module in (MLP, TritonSwiGLUMLP, ActivationRecomputeMLP, TritonActivationRecomputeMLP):  # a dense layer
        moe_model = config.num_moe_experts is not None
        if "mlp_act" in recompute and not moe_model:
            mlp.module = TritonActivationRecomputeMLP if gpu else ActivationRecomputeMLP
        else:
            mlp.module = TritonSwiGLUMLP if gpu else MLP
        if options.fp8 and not moe_model:
            # fp8 linears hold their input itself where it is held anyway: the output projection's
            # (the core attention keeps it), and inputs a recompute refills before their backward.
            norm_refilled = "layernorm" in recompute
            attention.linear_qkv = _fp8(Fp8ColumnParallelLinear, keep_input=norm_refilled)
            attention.linear_proj = _fp8(Fp8RowParallelLinear, keep_input=True)
            mlp.submodules.linear_fc1 = _fp8(Fp8ColumnParallelLinear, keep_input=norm_refilled)
            mlp.submodules.linear_fc2 = _fp8(Fp8RowParallelLinear, keep_input="mlp_act" in recompute)
        if options.lora is not None:
            _lora(options.lora, attention, mlp.submodules)
        return
    experts = mlp.submodules.experts  # a MoE layer
    if mlp.module in (MoELayer, FusedMoELayer):
        mlp.module = FusedMoELayer if gpu and options.moe_dispatch == "fused" else MoELayer
    if experts.module in (SequentialMLP, GroupedGemmExperts):
        # (the grouped GEMM reads the expert weights alone: adapted experts run one by one)
        lora_experts = options.lora is not None and "experts" in options.lora.targets
        experts.module = SequentialMLP if lora_experts else GroupedGemmExperts
    shared = mlp.submodules.shared_experts
    if shared is not None and shared.module in (SharedExpertMLP, TritonSwiGLUSharedExpertMLP):
        shared.module = TritonSwiGLUSharedExpertMLP if gpu else SharedExpertMLP
    if options.lora is not None:
        _lora(options.lora, attention, shared.submodules if shared is not None else None, experts.submodules)


def _fp8(linear: type, keep_input: bool) -> ModuleSpec:
    return ModuleSpec(module=linear, params={"keep_input": keep_input})


def _lora(lora: LoraOptions, attention, mlp, experts=None) -> None:
    """The targeted linears of one layer as LoRA linears: qkv/proj of its attention, fc1/fc2 of its
    dense MLP or shared expert (`mlp`), both linears of every routed expert (`experts`). fc1's B is
    stored as fc1's weight ([gate; up], `swiglu`). A slot the fp8 linears serve gets the fp8 LoRA
    linear, with the same `keep_input`."""
    column, row = (LoraColumnParallelLinear, LoraFp8ColumnParallelLinear), (LoraRowParallelLinear,
                                                                             LoraFp8RowParallelLinear)
    slots = {"qkv": [(attention, "linear_qkv", column)], "proj": [(attention, "linear_proj", row)],
             "fc1": [(mlp, "linear_fc1", column)], "fc2": [(mlp, "linear_fc2", row)],
             "experts": [(experts, "linear_fc1", column), (experts, "linear_fc2", row)]}
    for target in lora.targets:
        for holder, slot, (plain, fp8) in slots[target]:
            if holder is None:
                continue
            current = getattr(holder, slot)
            params = dict(getattr(current, "params", None) or {})
            served_fp8 = getattr(current, "module", None) in (Fp8ColumnParallelLinear, Fp8RowParallelLinear)
            linear = fp8 if served_fp8 else plain
            setattr(holder, slot, ModuleSpec(module=linear, params={**params, "lora": lora,
                                                                    "swiglu": slot == "linear_fc1"}))


def slots(spec: ModuleSpec | TransformerBlockSubmodules, model: type[GPTModel]) -> dict[str, str]:
    """Slot -> the name of the class (or function) serving it, for the first layer of `spec` and,
    for MoE models, its first MoE layer."""
    block = spec if isinstance(spec, TransformerBlockSubmodules) else None
    layers = block.layer_specs if block is not None else [spec]
    out = {"loss": model.__name__}
    for layer in layers:
        moe = getattr(layer.submodules.mlp.submodules, "experts", None) is not None
        if moe or "layer" not in out:
            out.update(_layer_slots(layer, prefix="moe " if moe else ""))
        if moe:
            break
    if block is not None:
        out["final_norm"] = _name(block.layer_norm)
    return out


def _layer_slots(spec: ModuleSpec, prefix: str) -> dict[str, str]:
    layer = spec.submodules
    attention = layer.self_attention.submodules
    mlp = layer.mlp.submodules
    params = getattr(spec, "params", {}) or {}
    checkpoint = params.get("norm_checkpoint") or CheckpointWithoutOutput
    out = {"layer": _name(spec), "norm": _name(layer.input_layernorm), "pre_mlp_norm": _name(layer.pre_mlp_layernorm),
           "residual_add": _name(layer.mlp_bda), "attention": _name(layer.self_attention),
           "core_attention": _name(attention.core_attention), "q_norm": _name(attention.q_layernorm),
           "linear_qkv": _name(attention.linear_qkv), "linear_proj": _name(attention.linear_proj),
           "mlp": _name(layer.mlp), "norm_recompute": checkpoint.__name__}
    if getattr(mlp, "experts", None) is not None:
        out["experts"] = _name(mlp.experts)
        out["shared_experts"] = _name(mlp.shared_experts)
    else:
        out["linear_fc1"], out["linear_fc2"] = _name(mlp.linear_fc1), _name(mlp.linear_fc2)
    return {(prefix + k if k not in ("loss", "final_norm") else k): v for k, v in out.items()}


def _name(spec) -> str:
    if spec is None:
        return "None"
    module = getattr(spec, "module", spec)
    name = getattr(module, "__name__", type(module).__name__)
    if name == get_bias_dropout_add.__name__:
        return "get_bias_dropout_add"
    params = getattr(spec, "params", None) or {}
    if params.get("keep_input"):
        return f"{name}(keep_input)"
    if "lora" in params:
        return f"{name}(rank={params['lora'].rank})"
    return f"{name}({params['mode']})" if "mode" in params else name
