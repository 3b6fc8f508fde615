"""Whole-config validation, run before any process group exists.

`validate` takes the composed config, the world size and the device type and returns the typed,
frozen config with what depends on them resolved (the layout, `checkpoint.load=auto`,
`train.cuda_graph`); it never changes its input. Every rule raises `ConfigError` with the
offending key and the reason; the CLIs print it as one line and exit 2, so a bad layout fails in
a second rather than after NCCL start-up.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from launcher import run_dir
from launcher.config.schema import JobConfig, ModelConfig
from models.args import padded_vocab_size
from models.kernels import ATTENTION_BACKENDS
from models.lora import TARGETS as LORA_TARGETS
from models.objectives import DPO_LOSSES, DPO_REFERENCES, OBJECTIVES, ORPO_NLL, SMOOTHED_LOSSES
from parallel import cuda_graph
from parallel.layout import Layout

# megatron-core's selective recompute submodules (TransformerConfig.recompute_modules), and
# mlp_act: the dense MLP's activation output (models/mlp_act_recompute.py).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe", "moe_act", "shared_experts", "mlp_act")


PEFT_METHODS = ("none", "lora")


class ConfigError(ValueError):
    """A config value that cannot run: `key` names it, `reason` says why."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"config error: {key}: {reason}")
        self.key, self.reason = key, reason


class WorldSizeError(ConfigError):
    """The world size is not a multiple of `product` (e.g. tp*pp*cp) = `size`: the number of ranks
    does not fit the parallel layout (launcher.submit names the cluster's nodes instead)."""

    def __init__(self, key: str, world_size: int, product: str, size: int):
        super().__init__(key, f"world size {world_size} is not divisible by {product} = {size}")
        self.product, self.size = product, size


@dataclass(frozen=True)
class ResolvedConfig:
    config: JobConfig       # typed and frozen; checkpoint.load is a directory or None (auto resolved)
    layout: Layout
    cuda_graph: bool        # train.cuda_graph resolved for this device and world size
    resuming: bool = False  # continues run.dir's own run from its checkpoint.dir
    start_step: int = 0     # the step of the checkpoint checkpoint.load names (0: a fresh start)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def typed(cfg: DictConfig | JobConfig) -> JobConfig:
    """The composed config as its frozen dataclasses; a key left at `???` or one the schema does
    not have is a ConfigError."""
    if not isinstance(cfg, DictConfig):
        return cfg
    check_known_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise ConfigError(err.full_key, "must be set (it has no default)") from None


def check_known_keys(cfg: DictConfig) -> None:
    """Every key of a typed node is a field of its schema. Hydra refuses `train.stepz=5` but, as its
    own error message suggests, takes `+train.stepz=5` into a typed node without a word; the run
    would then train with the key ignored. Free-form mappings (e.g. cluster.env) take any key."""
    _check_node(cfg, "")


def _check_node(node: DictConfig, prefix: str) -> None:
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        fields = {f.name for f in dataclasses.fields(schema)}
        for key in node.keys():
            if key not in fields and not (not prefix and key == "hydra"):
                name = node._get_node("name") if "name" in fields else None
                option = name._value() if name is not None and isinstance(name._value(), str) else None
                raise ConfigError(f"{prefix}{key}", unknown_key_reason(prefix, str(key), schema, option))
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none() \
                and not child._is_interpolation():
            _check_node(child, f"{prefix}{key}.")


def unknown_key_reason(prefix: str, key: str, schema: Any, option: str | None = None) -> str:
    """Why `<prefix><key>` is refused: the schema (a dataclass) has no such field; the nearest names."""
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    reason = "unknown key" + (f" (did you mean {prefix}{close[0]}?)" if close else "")
    if option is not None:  # a group option: its own keys differ from the other options'
        reason += f"; {prefix.rstrip('.')}={option} has no such key"
    elif not close and dataclasses.is_dataclass(schema):
        reason += f"; {schema.__name__} has no such key"
    return reason


def validate(cfg: DictConfig | JobConfig, world_size: int, device_type: str, *,
             writes_run_dir: bool = True) -> ResolvedConfig:
    """Validate `cfg` for `world_size` ranks on `device_type` (cpu, cuda, or auto: a submit host
    that does not know the nodes' device yet). `writes_run_dir=False` (launcher.evaluate: reads a
    checkpoint, writes no run) skips the rules that keep a run from overwriting another."""
    c = typed(cfg)
    p, m, t = c.parallel, c.model, c.train
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.cp", p.cp), ("parallel.ep", p.ep),
                       ("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                       ("model.num_attention_heads", m.num_attention_heads),
                       ("model.num_query_groups", m.num_query_groups), ("model.vocab_size", m.vocab_size),
                       ("train.steps", t.steps), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.global_batch_size", t.global_batch_size), ("train.seq_length", t.seq_length)):
        _positive(key, value)
    _check_lora(c)
    _check_objective(c)
    moe = m.num_experts is not None

    if p.engine == "deepspeed":
        _check_deepspeed(c)
    elif p.engine != "megatron":
        raise ConfigError("parallel.engine", f"unknown engine {p.engine!r} (available: megatron, deepspeed)")
    if c.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu or cuda, got {c.device!r}")
    if t.precision not in ("auto", "bf16", "fp32", "fp8"):
        raise ConfigError("train.precision", f"must be auto, bf16, fp32 or fp8, got {t.precision!r}")
    if t.precision == "fp8":  # models/kernels/fp8_linear.py: the torch backend's dense layers
        if p.engine != "megatron" or moe:
            raise ConfigError("train.precision", "fp8 runs the linears of dense models under parallel.engine=megatron")
        if t.compile:
            raise ConfigError("train.precision", "fp8 layers run eager or CUDA-graphed: set train.compile=false")
    _check_recompute(c)
    if t.attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError("train.attention_backend", f"must be one of {', '.join(ATTENTION_BACKENDS)}, "
                                                     f"got {t.attention_backend!r}")
    if t.moe_dispatch not in ("fused", "megatron"):
        raise ConfigError("train.moe_dispatch", f"must be fused or megatron, got {t.moe_dispatch!r}")
    if t.compile and p.engine != "megatron":
        raise ConfigError("train.compile", "compiles megatron-core layers: needs parallel.engine=megatron")
    if t.compile and isinstance(t.recompute, list):
        raise ConfigError("train.compile", "megatron's per-module recompute (train.recompute as a list) does not "
                                           "trace under torch.compile; use recompute null, selective or full")
    if t.compile and moe:
        raise ConfigError("train.compile", f"model={m.name} is a mixture of experts; compiled layers are dense only "
                                           "(MoE routing sends a data-dependent number of tokens to each expert)")
    # (auto leaves a preference objective's steps uncaptured: its micro batches carry per-step scalars)
    if t.offload_activations and p.engine != "megatron":
        raise ConfigError("train.offload_activations", "offloads megatron-core's saved activations: needs "
                                                       "parallel.engine=megatron (DeepSpeed has its own)")
    if t.offload_activations and t.cuda_graph is True:
        raise ConfigError("train.offload_activations", "host copies are not captured by a CUDA graph: "
                                                       "set train.cuda_graph=false or auto")
    graphed = (_check_cuda_graph(c, device_type, world_size) and t.objective == "lm" and t.peft == "none"
               and not t.offload_activations)
    _check_precision_aware(c, device_type)
    _check_optimizer_offload(c, device_type)
    if c.logging.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError("logging.wandb.mode", f"must be offline, online or disabled, got {c.logging.wandb.mode!r}")

    _check_tensor_parallel(m, p.tp)
    if p.vpp is not None:
        if p.vpp < 1:
            raise ConfigError("parallel.vpp", f"must be null or a positive integer, got {p.vpp!r}")
        if p.pp < 2 and p.vpp > 1:
            raise ConfigError("parallel.vpp", f"vpp={p.vpp} needs parallel.pp > 1 (interleaved pipeline)")
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        what = f"pp={p.pp} x vpp={p.vpp}" if p.vpp else f"pp={p.pp}"
        raise ConfigError("parallel.pp", f"{what} must divide model.num_layers={m.num_layers}")
    _check_context_parallel(c)
    if not moe:
        if p.ep != 1:
            raise ConfigError("parallel.ep", f"ep={p.ep} needs an MoE model (model.num_experts is null); ep must be 1")
    else:
        _check_moe(m, p.tp, p.ep)

    layout = _layout(c, world_size)
    _check_eval(c)
    _check_logging(c)
    load, resuming = _check_checkpoint(c, world_size, writes_run_dir)
    config = dataclasses.replace(c, checkpoint=dataclasses.replace(c.checkpoint, load=load))
    # under LoRA a checkpoint without adapters is the base: the adapters start at step 0
    continues = load is not None and (_check_lora_checkpoint(c, load) or t.peft == "none")
    start_step = _saved_step(load) if continues else 0
    if t.objective == "dpo" and c.dpo.reference == "live" and start_step > 0:
        from launcher import checkpoint

        try:
            checkpoint.check_live_reference(load)
        except (OSError, ValueError) as err:
            raise ConfigError("dpo.reference", str(err)) from err
    return ResolvedConfig(config=config, layout=layout, cuda_graph=graphed, resuming=resuming, start_step=start_step)


def _positive(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, f"must be a positive integer, got {value!r}")
    return value


def _check_objective(c: JobConfig) -> None:
    """train.objective and the keys of the preference objectives (dpo.*, simpo.*, orpo.*), and the
    layouts a preference objective runs in (`_check_preference_run`)."""
    objective = c.train.objective
    if objective not in OBJECTIVES:
        raise ConfigError("train.objective", f"must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    d, s = c.dpo, c.simpo
    if d.loss not in DPO_LOSSES:
        raise ConfigError("dpo.loss", f"must be one of {', '.join(DPO_LOSSES)}, got {d.loss!r}")
    if d.reference not in DPO_REFERENCES:
        raise ConfigError("dpo.reference", f"must be one of {', '.join(DPO_REFERENCES)}, got {d.reference!r}")
    for key, value in (("dpo.beta", d.beta), ("simpo.beta", s.beta), ("orpo.beta", c.orpo.beta)):
        if not value > 0:
            raise ConfigError(key, f"must be > 0, got {value!r}")
    for key, value in (("dpo.label_smoothing", d.label_smoothing), ("simpo.label_smoothing", s.label_smoothing)):
        if not 0 <= value < 0.5:
            raise ConfigError(key, f"must be in [0, 0.5) (the probability that a preference label is flipped), "
                                   f"got {value!r}")
    if c.orpo.nll not in ORPO_NLL:
        raise ConfigError("orpo.nll", f"must be one of {', '.join(ORPO_NLL)}, got {c.orpo.nll!r}")
    if d.label_smoothing and d.loss not in SMOOTHED_LOSSES:
        raise ConfigError("dpo.label_smoothing", f"applies to dpo.loss={' or '.join(SMOOTHED_LOSSES)}; "
                                                 f"dpo.loss={d.loss} takes none (set 0)")
    for key, value in (("dpo.sft_weight", d.sft_weight), ("simpo.sft_weight", s.sft_weight),
                       ("simpo.gamma", s.gamma)):
        if not value >= 0:
            raise ConfigError(key, f"must be >= 0, got {value!r}")
    if objective != "lm":
        _check_preference_run(c)


def _check_lora(c: JobConfig) -> None:
    """train.peft and the lora section; LoRA runs on the megatron engine with eager layers (auto leaves
    its steps uncaptured by CUDA graphs)."""
    t, lora = c.train, c.lora
    if t.peft not in PEFT_METHODS:
        raise ConfigError("train.peft", f"must be one of {', '.join(PEFT_METHODS)}, got {t.peft!r}")
    if t.peft == "none":
        return
    _positive("lora.rank", lora.rank)
    if not lora.alpha > 0:
        raise ConfigError("lora.alpha", f"must be > 0, got {lora.alpha!r}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError("lora.dropout", f"must be in [0, 1), got {lora.dropout!r}")
    targets = list(lora.targets or [])
    unknown = [x for x in targets if x not in LORA_TARGETS]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise ConfigError("lora.targets", f"must be a non-empty list of distinct names out of "
                                          f"{', '.join(LORA_TARGETS)}, got {targets}")
    if "experts" in targets and c.model.num_experts is None:
        raise ConfigError("lora.targets", f"experts (the routed experts' linears) needs a mixture-of-experts model; "
                                          f"model={c.model.name} is dense")
    dense_mlps = c.model.num_experts is None or 0 in c.model.moe_layer_pattern() or \
        c.model.moe_shared_expert_intermediate_size is not None
    if not dense_mlps and {"fc1", "fc2"} & set(targets):
        raise ConfigError("lora.targets", f"fc1 and fc2 adapt dense MLPs and shared experts; model={c.model.name} "
                                          f"has neither (its routed experts' linears: experts)")
    refusals = (("parallel.engine", c.parallel.engine != "megatron", f"parallel.engine={c.parallel.engine}"),
                ("lora.base_fp8", lora.base_fp8 and t.precision == "fp8", "lora.base_fp8 and train.precision=fp8"),
                ("train.compile", t.compile, "train.compile=true"),
                ("train.cuda_graph", t.cuda_graph is True, "train.cuda_graph=true"))
    for key, refused, what in refusals:
        if refused:
            raise ConfigError(key, f"train.peft=lora does not run with {what} yet")


def _check_preference_run(c: JobConfig) -> None:
    """A preference objective trains on the megatron engine (tp, pp with or without virtual stages, dp,
    ep, cp) or ZeRO-3 (tp, dp), rows of whole pairs (one sequence per row, or pairs packed:
    data.packing) from preference datasets read together (and evaluates on others, or on data.split's
    held-out pairs); DPO's reference precomputed or live."""
    p, t, d, objective = c.parallel, c.train, c.data, c.train.objective
    refusals = (("data.reset_attention_mask", bool(d.reset_attention_mask), "reset_attention_mask (use "
                 "data.packing=true)"),
                ("train.cuda_graph", t.cuda_graph is True, "cuda_graph=true"))
    for key, refused, what in refusals:
        if refused:
            raise ConfigError(key, f"train.objective={objective} does not run with {what} yet")
    if d.name == "stdlib_docs" or not (getattr(d, "prefixes", []) or []):
        raise ConfigError("data.prefixes", f"train.objective={objective} trains on preference datasets "
                                           f"(data=indexed data.prefixes=[<prefix>, ...], from launcher.preprocess "
                                           f"format=preference)")
    if d.weights is not None and len(d.prefixes) > 1:
        raise ConfigError("data.weights", f"train.objective={objective} reads its datasets' pairs together (every "
                                          f"pair once an epoch), unweighted: drop data.weights")
    for key, value in (("train.micro_batch_size", t.micro_batch_size), ("train.global_batch_size",
                                                                        t.global_batch_size)):
        if value % 2 and not d.packing:  # packed rows hold whole pairs each
            raise ConfigError(key, f"{value} must be even under train.objective={objective} (rows come in pairs: "
                                   f"chosen, rejected)")


def _check_context_parallel(c: JobConfig) -> None:
    """parallel.cp > 1: the megatron engine, rows whose length splits into 2·cp chunks; packed rows
    (each document split over the CP ranks) without pipeline stages or experts."""
    p, t = c.parallel, c.train
    if p.cp_mode not in ("ring", "allgather"):
        raise ConfigError("parallel.cp_mode", f"must be ring or allgather, got {p.cp_mode!r}")
    if p.cp == 1:
        return
    if p.engine != "megatron":
        raise ConfigError("parallel.cp", f"cp={p.cp} needs parallel.engine=megatron")
    if t.seq_length % (2 * p.cp):
        raise ConfigError("train.seq_length", f"{t.seq_length} must be a multiple of 2 x parallel.cp = {2 * p.cp} "
                                              "(each context-parallel rank holds two equal chunks)")
    if (c.data.packing or c.data.reset_attention_mask) and p.pp > 1:
        # each CP rank's share of a packed micro batch depends on its documents (each padded to a
        # multiple of 2·cp), while pipeline stages exchange activations of one fixed length
        key = "data.packing" if c.data.packing else "data.reset_attention_mask"
        raise ConfigError(key, f"packed rows under parallel.cp={p.cp} do not run with parallel.pp={p.pp}")
    if (c.data.packing or c.data.reset_attention_mask) and c.model.num_experts is not None:
        # the padding each document gets (to a multiple of 2·cp) would be routed like real tokens
        key = "data.packing" if c.data.packing else "data.reset_attention_mask"
        raise ConfigError(key, f"packed rows under parallel.cp={p.cp} do not run with a mixture-of-experts model "
                               f"(model={c.model.name})")
    if t.compile:
        raise ConfigError("train.compile", f"compiled layers do not run under parallel.cp={p.cp} yet")


def _check_recompute(c: JobConfig) -> None:
    recompute, moe = c.train.recompute, c.model.num_experts is not None
    if isinstance(recompute, list):
        unknown = [name for name in recompute if name not in RECOMPUTE_MODULES]
        if not recompute or unknown:
            raise ConfigError("train.recompute", f"a module list takes {', '.join(RECOMPUTE_MODULES)}; "
                                                 f"got {recompute}")
        if "mlp_act" in recompute and (moe or c.parallel.engine != "megatron"):
            raise ConfigError("train.recompute", "mlp_act recomputes the dense MLP's activation (engine=megatron, "
                                                 "dense models; MoE experts: moe_act)")
    elif recompute not in (None, "selective", "full"):
        raise ConfigError("train.recompute", f"must be null, selective, full or a list of modules "
                                             f"({', '.join(RECOMPUTE_MODULES)}), got {recompute!r}")


def _fp32_params(c: JobConfig, device_type: str) -> bool:
    """Whether this run's parameters are fp32: train.precision=fp32, or auto on CPU (fp8 runs keep
    bf16 params). `device_type` auto (a submit host) counts as a GPU."""
    return c.train.precision == "fp32" or (c.train.precision == "auto" and device_type == "cpu")


def _fused_moe_fallbacks(c: JobConfig, device_type: str) -> list[str]:
    """Why this MoE run's fused layers would take megatron's path. The GPU is asked only where
    this process has one: a submit host (or a test) validating a CUDA job assumes it qualifies."""
    import torch

    from models.fused_moe import config_fallbacks
    from models.kernels.grouped_experts import grouped_mm_available

    t, p = c.train, c.parallel
    grouped_mm = device_type != "cuda" or not torch.cuda.is_available() or grouped_mm_available(torch.device("cuda"))
    return config_fallbacks(num_experts=c.model.num_experts, ep=p.ep, tp=p.tp,
                            capacity_factor=c.model.moe_expert_capacity_factor,
                            bf16=not _fp32_params(c, device_type),
                            recompute=t.recompute, grouped_mm=grouped_mm)


def _check_cuda_graph(c: JobConfig, device_type: str, world_size: int) -> bool:
    """train.cuda_graph=true must be able to apply; returns whether this run captures its steps.
    `device_type` auto (a submit host) rules nothing out; launcher.train passes the resolved one."""
    setting = c.train.cuda_graph
    if setting != "auto" and not isinstance(setting, bool):
        raise ConfigError("train.cuda_graph", f"must be auto, true or false, got {setting!r}")
    moe = c.model.num_experts is not None
    run = dict(device_type=device_type, world_size=world_size, engine=c.parallel.engine,
               moe_dispatch=c.train.moe_dispatch if moe else None, packing=c.data.packing, pp=c.parallel.pp,
               cpu_offload=c.optim.cpu_offload, moe_fallbacks=_fused_moe_fallbacks(c, device_type) if moe else [])
    if setting is True:
        why = cuda_graph.blockers(setting, **run)
        if why:
            raise ConfigError("train.cuda_graph", "; ".join(why) + " (set auto or false)")
    return cuda_graph.resolve(setting, **run)


def check_fp8_device(precision: str, device: Any) -> None:
    """train.precision=fp8 on CUDA needs fp8 tensor cores (compute capability 8.9: Ada, Hopper and
    later); on CPU the fp8 GEMMs run as fp32 matmuls of the fp8 operands (for tests)."""
    if precision == "fp8" and device.type == "cuda":
        import torch

        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ConfigError("train.precision", f"fp8 needs a GPU of compute capability 8.9 or later; "
                                                 f"this one is {capability[0]}.{capability[1]}")


def _check_precision_aware(c: JobConfig, device_type: str) -> None:
    """optim.precision_aware / moments_dtype / main_grads_dtype / master_weights (parallel/fused_adam.py);
    precision auto is fp32 on CPU."""
    o = c.optim
    if o.moments_dtype not in ("fp32", "bf16"):
        raise ConfigError("optim.moments_dtype", f"must be fp32 or bf16, got {o.moments_dtype!r}")
    if o.main_grads_dtype not in ("fp32", "bf16"):
        raise ConfigError("optim.main_grads_dtype", f"must be fp32 or bf16, got {o.main_grads_dtype!r}")
    if o.master_weights not in ("exact", "stochastic"):
        raise ConfigError("optim.master_weights", f"must be exact or stochastic, got {o.master_weights!r}")
    if not o.precision_aware:
        if o.master_weights != "exact":
            raise ConfigError("optim.master_weights", "stochastic rounding needs optim.precision_aware=true")
        if o.moments_dtype != "fp32":
            raise ConfigError("optim.moments_dtype", "bf16 moments need optim.precision_aware=true")
        if o.main_grads_dtype != "fp32" and not o.cpu_offload:
            raise ConfigError("optim.main_grads_dtype", "bf16 main grads need optim.precision_aware=true "
                                                        "(or optim.cpu_offload=true)")
        return
    if c.parallel.engine != "megatron":
        raise ConfigError("optim.precision_aware",
                          "is megatron-core's distributed optimizer: needs parallel.engine=megatron")
    if not c.parallel.distributed_optimizer:
        raise ConfigError("optim.precision_aware", "needs parallel.distributed_optimizer=true")
    if _fp32_params(c, device_type):
        raise ConfigError("optim.precision_aware", "keeps the master weights inside bf16 params: needs "
                                                   "train.precision=bf16 (auto is fp32 on CPU)")


def _check_optimizer_offload(c: JobConfig, device_type: str) -> None:
    """optim.cpu_offload: megatron-core's HybridDeviceOptimizer under its distributed optimizer."""
    if not c.optim.cpu_offload:
        return
    if c.parallel.engine != "megatron":
        raise ConfigError("optim.cpu_offload", "is megatron-core's optimizer offload: needs parallel.engine=megatron "
                                               "(DeepSpeed: parallel.zero.offload_optimizer=cpu)")
    if not c.parallel.distributed_optimizer:
        raise ConfigError("optim.cpu_offload", "needs parallel.distributed_optimizer=true")
    if c.optim.precision_aware:
        raise ConfigError("optim.cpu_offload", "steps fp32 masters on the host with torch's AdamW: "
                                               "set optim.precision_aware=false")
    if c.optim.main_grads_dtype == "bf16" and _fp32_params(c, device_type):
        raise ConfigError("optim.main_grads_dtype", "bf16 main grads hold bf16 params' gradients: needs "
                                                    "train.precision=bf16 (auto is fp32 on CPU)")


def _check_tensor_parallel(m: ModelConfig, tp: int) -> None:
    if m.num_attention_heads % tp:
        raise ConfigError("parallel.tp", f"tp={tp} must divide model.num_attention_heads={m.num_attention_heads}")
    if m.num_query_groups % tp:
        raise ConfigError("parallel.tp", f"tp={tp} must divide model.num_query_groups={m.num_query_groups}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError("model.num_query_groups",
                          f"{m.num_query_groups} must divide model.num_attention_heads={m.num_attention_heads}")
    if m.ffn_hidden_size % tp:
        raise ConfigError("parallel.tp", f"tp={tp} must divide model.ffn_hidden_size={m.ffn_hidden_size}")
    if padded_vocab_size(m.vocab_size) % tp:
        raise ConfigError("parallel.tp", f"tp={tp} must divide the padded vocab {padded_vocab_size(m.vocab_size)}")


def _layout(c: JobConfig, world_size: int) -> Layout:
    """The ranks split into tp x pp x cp x dp (x ep for expert layers), and the batch over dp."""
    p, t = c.parallel, c.train
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise WorldSizeError("parallel", world_size, "tp*pp*cp", model_parallel)
    # Expert layers split the same ranks as tp(=expert tp) x ep x expert-dp per pipeline stage.
    expert_parallel = p.tp * p.ep * p.pp
    if world_size % expert_parallel:
        raise WorldSizeError("parallel.ep", world_size, "tp*ep*pp", expert_parallel)
    dp = world_size // model_parallel
    if p.dp is not None and p.dp != dp:
        raise ConfigError("parallel.dp", f"dp={p.dp} but world size {world_size} = tp {p.tp} x pp {p.pp} x cp {p.cp} "
                                         f"x dp {dp}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError("train.global_batch_size", f"{t.global_batch_size} must be divisible by "
                                                     f"micro_batch_size {t.micro_batch_size} x dp {dp}")
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    if p.vpp and p.vpp > 1 and microbatches % p.pp:
        raise ConfigError("train.global_batch_size", f"interleaved pipeline needs the number of micro batches "
                                                     f"({microbatches}) to be a multiple of pp={p.pp}")
    if t.seq_length > c.model.max_position_embeddings:
        raise ConfigError("train.seq_length", f"{t.seq_length} exceeds model.max_position_embeddings="
                                              f"{c.model.max_position_embeddings}")
    return Layout(world_size=world_size, tp=p.tp, pp=p.pp, vpp=p.vpp if p.vpp and p.vpp > 1 else None,
                  cp=p.cp, ep=p.ep, dp=dp)


def validation_bookends(c: JobConfig) -> tuple[Any, Any]:
    """(train, valid) document book-ends of data.split; (None, None) without a split."""
    if c.data.split is None:
        return None, None
    from launcher.data.split import split_bookends

    try:
        return split_bookends(c.data.split)
    except ValueError as err:
        raise ConfigError("data.split", str(err).removeprefix("data.split: ")) from None


def has_validation_data(c: JobConfig) -> bool:
    return bool(c.data.valid_prefixes) or validation_bookends(c)[1] is not None


def _check_eval(c: JobConfig) -> None:
    """eval.* and the validation data they read (data.split / data.valid_prefixes)."""
    e, d = c.eval, c.data
    if e.every < 0:
        raise ConfigError("eval.every", f"must be >= 0, got {e.every}")
    _positive("eval.iters", e.iters)
    validation_bookends(c)  # a malformed data.split fails here, eval or not
    if d.split is not None and d.valid_prefixes:
        raise ConfigError("data.valid_prefixes", "give either data.split or data.valid_prefixes, not both")
    if e.every and not has_validation_data(c):
        raise ConfigError("eval.every", "needs validation data: data.split=98/2 or data.valid_prefixes=[...]")


def _check_logging(c: JobConfig) -> None:
    profile = c.logging.profile_steps
    if profile is not None and (len(profile) != 2 or min(profile) < 1 or profile[0] > profile[1]):
        raise ConfigError("logging.profile_steps", f"must be null or [start, end] with 1 <= start <= end, "
                                                   f"got {profile}")
    snap = c.logging.memory_snapshot
    if snap is not None and snap < 1:
        raise ConfigError("logging.memory_snapshot", f"must be null or a step number >= 1, got {snap!r}")
    if c.logging.tensorboard and not _importable("tensorboard"):  # torch.utils.tensorboard needs it
        raise ConfigError("logging.tensorboard", 'needs the tensorboard package: pip install "tensorboard>=2.16"')


def _importable(module: str) -> bool:
    try:  # find_spec, not import: only whether it is installed
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_checkpoint(c: JobConfig, world_size: int, writes_run_dir: bool = True) -> tuple[str | None, bool]:
    """checkpoint.* and run.* rules; returns checkpoint.load resolved (a directory or None) and
    whether it resumes run.dir's own run (a checkpoint in checkpoint.dir)."""
    ck = c.checkpoint
    if ck.save_every < 0:
        raise ConfigError("checkpoint.save_every", f"must be >= 0, got {ck.save_every}")
    if ck.keep_last is not None and ck.keep_last < 1:
        raise ConfigError("checkpoint.keep_last", f"must be null or a positive integer, got {ck.keep_last!r}")
    load, auto = ck.load, ck.load == "auto"
    own = run_dir.checkpoint_step(ck.dir) is not None  # this run's checkpoint.dir has a `latest`
    if auto:
        # Megatron's --load = --save: this run's own newest checkpoint when there is one (a requeued
        # or restarted job), else a fresh start; run.overwrite=true starts fresh whatever is there.
        load = ck.dir if own and not c.run.overwrite else None
    resuming = load is not None and _same_dir(_checkpoint_root(load), ck.dir)
    if c.run.overwrite and resuming:
        raise ConfigError("run.overwrite", f"checkpoint.load={load} is this run's own checkpoint.dir, which "
                                           "run.overwrite=true moves aside; resume without run.overwrite")
    if writes_run_dir and not resuming and not c.run.overwrite:
        steps = run_dir.previous_run(c.run.dir, ck.dir)
        if steps is not None:
            how = ("resume with checkpoint.load=auto, or pass run.overwrite=true to move it aside" if own else
                   "it has no checkpoint to resume from: pass run.overwrite=true to move it aside and start again")
            raise ConfigError("run.dir", f"{c.run.dir} holds a run ({steps} steps); {how}")
    if load is None:
        return None, False
    if not os.path.isdir(load):
        raise ConfigError("checkpoint.load", f"no checkpoint directory at {load}")
    from launcher import checkpoint

    try:
        checkpoint.check_compatible(load, dataclasses.asdict(c.model))
        checkpoint.check_engine(load, c.parallel.engine, world_size, c.parallel.tp)
    except (OSError, ValueError) as err:
        hint = (f" (resuming {ck.dir}; pass run.overwrite=true to move that run aside and start a new one)"
                if auto else "")
        raise ConfigError("checkpoint.load", f"{err}{hint}") from err
    return load, resuming


def _check_lora_checkpoint(c: JobConfig, load: str) -> bool:
    """Whether checkpoint.load holds LoRA adapters (parallel/lora_checkpoint.py), which must be this
    run's: its rank, alpha and targets, and the base they were trained on."""
    from launcher.checkpoint import resolve
    from parallel.lora_checkpoint import missing_base, read_reference

    try:
        directory = resolve(load)
    except FileNotFoundError as err:
        raise ConfigError("checkpoint.load", str(err)) from err
    saved = read_reference(directory)
    if saved is None:
        return False
    if c.train.peft != "lora":
        raise ConfigError("checkpoint.load", f"{directory} holds LoRA adapters: train them with train.peft=lora, or "
                                             f"merge them first (python -m launcher.convert merge_lora "
                                             f"checkpoint={load} out=<dir>)")
    lora = c.lora
    for key, ours, theirs in (("lora.rank", lora.rank, saved["rank"]), ("lora.alpha", lora.alpha, saved["alpha"]),
                              ("lora.targets", list(lora.targets), saved["targets"]),
                              ("lora.base_fp8", lora.base_fp8, saved["base_fp8"])):
        if ours != theirs:
            raise ConfigError(key, f"{ours} differs from the adapters of checkpoint.load={load} ({theirs})")
    if saved["base"] is None and saved["seed"] != c.train.seed:
        raise ConfigError("train.seed", f"the adapters of checkpoint.load={load} were trained on the initial weights "
                                        f"of seed {saved['seed']}: set train.seed={saved['seed']}")
    if (missing := missing_base(saved)) is not None:
        raise ConfigError("checkpoint.load", missing)
    return True


def _saved_step(load: str) -> int:
    """The step of a checkpoint root's `latest` or of one iter_* directory, from its name."""
    name = Path(load).name
    if name.startswith("iter_") and name[5:].isdigit():
        return int(name[5:])
    return run_dir.checkpoint_step(load) or 0


def _checkpoint_root(path: str) -> str:
    """The directory holding `latest` for a checkpoint root or one of its iter_* directories."""
    p = Path(path)
    return str(p.parent if p.name.startswith("iter_") else p)


def _same_dir(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _check_deepspeed(c: JobConfig) -> None:
    """engine=deepspeed: ZeRO-3 over data parallel (x megatron tensor parallel), on a dense model, with
    DeepSpeed installed."""
    p, z = c.parallel, c.parallel.zero
    if p.pp != 1 or (p.vpp or 1) != 1:
        raise ConfigError("parallel.pp", f"pp={p.pp} with parallel.engine=deepspeed: ZeRO-3 does not compose with "
                                         "pipeline parallelism (use pp=1, or engine=megatron)")
    if c.model.num_experts is not None:
        raise ConfigError("parallel.engine", f"model={c.model.name} is a mixture of experts: "
                                             "engine=deepspeed trains dense models (use engine=megatron)")
    for key in ("offload_params", "offload_optimizer"):
        value = getattr(z, key)
        if value not in ("none", "cpu", "nvme"):
            raise ConfigError(f"parallel.zero.{key}", f"must be none, cpu or nvme, got {value!r}")
        if value == "nvme" and not z.nvme_path:
            raise ConfigError("parallel.zero.nvme_path", f"parallel.zero.{key}=nvme needs a directory here")
    if not _importable("deepspeed"):  # not imported here: that takes seconds and probes the accelerator
        raise ConfigError("parallel.engine", "deepspeed is not installed: pip install -e \".[deepspeed]\" "
                                             "(needs ninja and a C++ compiler for its CPU Adam)")


_MOE_CHOICES = {
    "moe_router_score_function": ("softmax", "sigmoid"),
    "moe_router_load_balancing_type": ("aux_loss", "seq_aux_loss", "none"),
    "moe_token_dispatcher_type": ("alltoall", "allgather"),
}


def _check_moe(m: ModelConfig, tp: int, ep: int) -> None:
    """Rules of an MoE model (model.num_experts set) and its expert-parallel layout."""
    experts = _positive("model.num_experts", m.num_experts)
    topk = _positive("model.moe_router_topk", m.moe_router_topk)
    if topk > experts:
        raise ConfigError("model.moe_router_topk", f"top-k {topk} exceeds model.num_experts={experts}")
    if experts % ep:
        raise ConfigError("parallel.ep", f"ep={ep} must divide model.num_experts={experts}")
    for key, choices in _MOE_CHOICES.items():
        if getattr(m, key) not in choices:
            raise ConfigError(f"model.{key}", f"must be one of {', '.join(choices)}, got {getattr(m, key)!r}")
    if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
        raise ConfigError("model.moe_router_enable_expert_bias",
                          "aux-loss-free expert bias needs model.moe_router_score_function=sigmoid")
    for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        if getattr(m, key) is not None:
            width = _positive(f"model.{key}", getattr(m, key))
            if width % tp:  # experts are tensor-parallel over the same ranks (expert TP = TP)
                raise ConfigError("parallel.tp", f"tp={tp} must divide model.{key}={width}")
    factor = m.moe_expert_capacity_factor
    if factor is not None and factor <= 0:
        raise ConfigError("model.moe_expert_capacity_factor", f"must be null (dropless) or > 0, got {factor!r}")
    groups, group_topk = m.moe_router_num_groups, m.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        raise ConfigError("model.moe_router_num_groups",
                          "group-limited routing needs both moe_router_num_groups and moe_router_group_topk")
    if groups is not None:
        groups, group_topk = _positive("model.moe_router_num_groups", groups), \
            _positive("model.moe_router_group_topk", group_topk)
        if experts % groups:
            raise ConfigError("model.moe_router_num_groups", f"{groups} must divide model.num_experts={experts}")
        if group_topk > groups:
            raise ConfigError("model.moe_router_group_topk", f"{group_topk} exceeds moe_router_num_groups={groups}")
        if topk % group_topk or topk // group_topk > experts // groups:
            raise ConfigError("model.moe_router_group_topk",
                              f"top-k {topk} must split evenly over {group_topk} groups of {experts // groups} experts")
    freq = m.moe_layer_freq
    if isinstance(freq, int):
        if isinstance(freq, bool) or freq < 1:
            raise ConfigError("model.moe_layer_freq", f"must be a positive integer or a 0/1 list, got {freq!r}")
    elif not isinstance(freq, list) or len(freq) != m.num_layers or any(x not in (0, 1) for x in freq):
        raise ConfigError("model.moe_layer_freq", f"a pattern needs one 0/1 entry per layer "
                                                  f"({m.num_layers}), got {freq!r}")
