"""Whole-config validation, run before any process group exists.

Every rule raises `ConfigError` naming the offending key; `launcher.train` prints it as one
line and exits non-zero, so a bad layout fails in a second rather than after NCCL start-up.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

from omegaconf import DictConfig, ListConfig

from models.args import padded_vocab_size
from parallel.layout import Layout


# megatron-core's selective recompute submodules (TransformerConfig.recompute_modules), and
# mlp_act: the dense MLP's activation output (models/mlp_act_recompute.py).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe", "moe_act", "shared_experts", "mlp_act")


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"config error: {key}: {message}")
        self.key = key


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _positive(cfg: DictConfig, key: str) -> int:
    value = cfg
    for part in key.split("."):
        value = value[part]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, f"must be a positive integer, got {value!r}")
    return value


def check_config(cfg: DictConfig, world_size: int) -> Layout:
    """Validate `cfg` for `world_size` ranks and return the resolved layout."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    for key in ("parallel.tp", "parallel.pp", "parallel.cp", "parallel.ep", "model.num_layers",
                "model.hidden_size", "model.num_attention_heads", "model.num_query_groups",
                "model.vocab_size", "train.steps", "train.micro_batch_size", "train.global_batch_size",
                "train.seq_length"):
        _positive(cfg, key)

    if p.engine == "deepspeed":
        _check_deepspeed(cfg)
    elif p.engine != "megatron":
        raise ConfigError("parallel.engine", f"unknown engine {p.engine!r} (available: megatron, deepspeed)")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu or cuda, got {cfg.device!r}")
    if t.precision not in ("auto", "bf16", "fp32", "fp8"):
        raise ConfigError("train.precision", f"must be auto, bf16, fp32 or fp8, got {t.precision!r}")
    if t.precision == "fp8":  # models/kernels/fp8_linear.py: the torch backend's dense layers
        if p.engine != "megatron" or m.get("num_experts") is not None:
            raise ConfigError("train.precision", "fp8 runs the linears of dense models under parallel.engine=megatron")
        if t.compile:
            raise ConfigError("train.precision", "fp8 layers run eager or CUDA-graphed: set train.compile=false")
    if isinstance(t.recompute, ListConfig):
        unknown = [m for m in t.recompute if m not in RECOMPUTE_MODULES]
        if not t.recompute or unknown:
            raise ConfigError("train.recompute", f"a module list takes {', '.join(RECOMPUTE_MODULES)}; "
                                                 f"got {list(t.recompute)}")
        if "mlp_act" in t.recompute and (m.get("num_experts") is not None or p.engine != "megatron"):
            raise ConfigError("train.recompute", "mlp_act recomputes the dense MLP's activation (engine=megatron, "
                                                 "dense models; MoE experts: moe_act)")
    elif t.recompute not in (None, "selective", "full"):
        raise ConfigError("train.recompute", f"must be null, selective, full or a list of modules "
                                             f"({', '.join(RECOMPUTE_MODULES)}), got {t.recompute!r}")
    if not isinstance(t.compile, bool):
        raise ConfigError("train.compile", f"must be true or false, got {t.compile!r}")
    if t.compile and p.engine != "megatron":
        raise ConfigError("train.compile", "compiles megatron-core layers: needs parallel.engine=megatron")
    if t.compile and isinstance(t.recompute, ListConfig):
        raise ConfigError("train.compile", "megatron's per-module recompute (train.recompute as a list) does not "
                                           "trace under torch.compile; use recompute null, selective or full")
    if t.compile and m.get("num_experts") is not None:
        raise ConfigError("train.compile", f"model={m.name} is a mixture of experts; compiled layers are dense only "
                                           "(MoE routing sends a data-dependent number of tokens to each expert)")
    check_cuda_graph(cfg, cfg.device, world_size)
    check_precision_aware(cfg, cfg.device)
    if cfg.logging.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError("logging.wandb.mode", f"must be offline, online or disabled, got {cfg.logging.wandb.mode!r}")

    if m.num_attention_heads % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.num_attention_heads={m.num_attention_heads}")
    if m.num_query_groups % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.num_query_groups={m.num_query_groups}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError("model.num_query_groups",
                          f"{m.num_query_groups} must divide model.num_attention_heads={m.num_attention_heads}")
    if m.ffn_hidden_size % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.ffn_hidden_size={m.ffn_hidden_size}")
    if padded_vocab_size(m.vocab_size) % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide the padded vocab {padded_vocab_size(m.vocab_size)}")

    if p.vpp is not None:
        if not isinstance(p.vpp, int) or p.vpp < 1:
            raise ConfigError("parallel.vpp", f"must be null or a positive integer, got {p.vpp!r}")
        if p.pp < 2 and p.vpp > 1:
            raise ConfigError("parallel.vpp", f"vpp={p.vpp} needs parallel.pp > 1 (interleaved pipeline)")
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        what = f"pp={p.pp} x vpp={p.vpp}" if p.vpp else f"pp={p.pp}"
        raise ConfigError("parallel.pp", f"{what} must divide model.num_layers={m.num_layers}")
    if p.cp != 1:
        raise ConfigError("parallel.cp", "context parallelism is not implemented yet (cp must be 1)")
    if m.get("num_experts") is None:
        if p.ep != 1:
            raise ConfigError("parallel.ep", f"ep={p.ep} needs an MoE model (model.num_experts is null); ep must be 1")
    else:
        _check_moe(cfg)

    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError("parallel", f"world size {world_size} is not divisible by tp*pp*cp = {model_parallel}")
    # Expert layers split the same ranks as tp(=expert tp) x ep x expert-dp per pipeline stage.
    expert_parallel = p.tp * p.ep * p.pp
    if world_size % expert_parallel:
        raise ConfigError("parallel.ep", f"world size {world_size} is not divisible by tp*ep*pp = {expert_parallel} "
                                         f"(ep={p.ep})")
    dp = world_size // model_parallel
    if p.dp is not None and p.dp != dp:
        raise ConfigError("parallel.dp", f"dp={p.dp} but world size {world_size} = tp {p.tp} x pp {p.pp} x cp {p.cp} "
                                         f"x dp {dp}")

    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError("train.global_batch_size", f"{t.global_batch_size} must be divisible by "
                                                     f"micro_batch_size {t.micro_batch_size} x dp {dp}")
    if p.vpp and p.vpp > 1 and (t.global_batch_size // (t.micro_batch_size * dp)) % p.pp:
        raise ConfigError("train.global_batch_size", f"interleaved pipeline needs the number of micro batches "
                                                     f"({t.global_batch_size // (t.micro_batch_size * dp)}) to be "
                                                     f"a multiple of pp={p.pp}")
    if t.seq_length > m.max_position_embeddings:
        raise ConfigError("train.seq_length", f"{t.seq_length} exceeds model.max_position_embeddings="
                                              f"{m.max_position_embeddings}")
    profile = cfg.logging.profile_steps
    if profile is not None and (len(profile) != 2 or not all(isinstance(s, int) and s >= 1 for s in profile)
                                or profile[0] > profile[1]):
        raise ConfigError("logging.profile_steps", f"must be null or [start, end] with 1 <= start <= end, "
                                                   f"got {list(profile) if not isinstance(profile, int) else profile}")
    snap = cfg.logging.memory_snapshot
    if snap is not None and (not isinstance(snap, int) or isinstance(snap, bool) or snap < 1):
        raise ConfigError("logging.memory_snapshot", f"must be null or a step number >= 1, got {snap!r}")
    if cfg.checkpoint.save_every < 0:
        raise ConfigError("checkpoint.save_every", f"must be >= 0, got {cfg.checkpoint.save_every}")
    keep = cfg.checkpoint.keep_last
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ConfigError("checkpoint.keep_last", f"must be null or a positive integer, got {keep!r}")
    if cfg.checkpoint.load == "auto":
        # Megatron's --load = --save: this run's own newest checkpoint when there is one (a requeued or
        # restarted job), else a fresh start. Resolved here, in place, so every consumer sees a path or null.
        has_latest = os.path.isfile(os.path.join(cfg.checkpoint.dir, "latest"))
        cfg.checkpoint.load = cfg.checkpoint.dir if has_latest else None
    if cfg.checkpoint.load is not None:
        if not os.path.isdir(cfg.checkpoint.load):
            raise ConfigError("checkpoint.load", f"no checkpoint directory at {cfg.checkpoint.load}")
        from launcher import checkpoint

        try:
            checkpoint.check_compatible(cfg.checkpoint.load, dict(cfg.model))
            checkpoint.check_engine(cfg.checkpoint.load, p.engine, world_size, p.tp)
        except (OSError, ValueError) as err:
            raise ConfigError("checkpoint.load", str(err)) from err
    return Layout(world_size=world_size, tp=p.tp, pp=p.pp, vpp=p.vpp if p.vpp and p.vpp > 1 else None,
                  cp=p.cp, ep=p.ep, dp=dp)


def check_cuda_graph(cfg: DictConfig, device_type: str, world_size: int) -> None:
    """train.cuda_graph=true must be able to apply. check_config passes the configured device
    (`auto` on a submit host says nothing yet); launcher.train checks again with the resolved one."""
    value = cfg.train.cuda_graph
    if value != "auto" and not isinstance(value, bool):
        raise ConfigError("train.cuda_graph", f"must be auto, true or false, got {value!r}")
    if value is True:
        from parallel.cuda_graph import blockers

        why = blockers(cfg, device_type, world_size)
        if why:
            raise ConfigError("train.cuda_graph", "; ".join(why) + " (set auto or false)")


def check_fp8_device(cfg: DictConfig, device: Any) -> None:
    """train.precision=fp8 on CUDA needs fp8 tensor cores (compute capability 8.9: Ada, Hopper and
    later); on CPU torch's `_scaled_mm` runs it (slowly: for tests)."""
    if cfg.train.precision == "fp8" and device.type == "cuda":
        import torch

        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ConfigError("train.precision", f"fp8 needs a GPU of compute capability 8.9 or later; "
                                                 f"this one is {capability[0]}.{capability[1]}")


def check_precision_aware(cfg: DictConfig, device_type: str) -> None:
    """optim.precision_aware / moments_dtype / main_grads_dtype / master_weights (parallel/fused_adam.py).
    Like check_cuda_graph, called with the configured device and again with the resolved one
    (precision auto depends on it)."""
    o = cfg.optim
    if not isinstance(o.precision_aware, bool):
        raise ConfigError("optim.precision_aware", f"must be true or false, got {o.precision_aware!r}")
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
        if o.main_grads_dtype != "fp32":
            raise ConfigError("optim.main_grads_dtype", "bf16 main grads need optim.precision_aware=true")
        return
    if cfg.parallel.engine != "megatron":
        raise ConfigError("optim.precision_aware", "is megatron-core's distributed optimizer: needs parallel.engine=megatron")
    if not cfg.parallel.distributed_optimizer:
        raise ConfigError("optim.precision_aware", "needs parallel.distributed_optimizer=true")
    precision = cfg.train.precision
    if precision == "fp32" or (precision == "auto" and device_type == "cpu"):  # (fp8: bf16 params)
        raise ConfigError("optim.precision_aware", "keeps the master weights inside bf16 params: needs "
                                                   "train.precision=bf16 (auto is fp32 on CPU)")


def _check_deepspeed(cfg: DictConfig) -> None:
    """engine=deepspeed: ZeRO-3 over data parallel (x megatron tensor parallel), on a dense model, with
    DeepSpeed installed."""
    p, z = cfg.parallel, cfg.parallel.zero
    if p.pp != 1 or (p.vpp or 1) != 1:
        raise ConfigError("parallel.pp", f"pp={p.pp} with parallel.engine=deepspeed: ZeRO-3 does not compose with "
                                         "pipeline parallelism (use pp=1, or engine=megatron)")
    if cfg.model.get("num_experts") is not None:
        raise ConfigError("parallel.engine", f"model={cfg.model.name} is a mixture of experts: "
                                             "engine=deepspeed trains dense models (use engine=megatron)")
    for key in ("offload_params", "offload_optimizer"):
        value = z[key] or "none"
        if value not in ("none", "cpu", "nvme"):
            raise ConfigError(f"parallel.zero.{key}", f"must be none, cpu or nvme, got {value!r}")
        if value == "nvme" and not z.nvme_path:
            raise ConfigError("parallel.zero.nvme_path", f"parallel.zero.{key}=nvme needs a directory here")
    try:  # find_spec, not import: importing deepspeed takes seconds and probes the accelerator
        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError("parallel.engine", "deepspeed is not installed: pip install -e \".[deepspeed]\" "
                                             "(needs ninja and a C++ compiler for its CPU Adam)")


_MOE_CHOICES = {
    "moe_router_score_function": ("softmax", "sigmoid"),
    "moe_router_load_balancing_type": ("aux_loss", "seq_aux_loss", "none"),
    "moe_token_dispatcher_type": ("alltoall", "allgather"),
}


def _check_moe(cfg: DictConfig) -> None:
    """Rules of an MoE model (model.num_experts set) and its expert-parallel layout."""
    p, m = cfg.parallel, cfg.model
    experts = _positive(cfg, "model.num_experts")
    topk = _positive(cfg, "model.moe_router_topk")
    if topk > experts:
        raise ConfigError("model.moe_router_topk", f"top-k {topk} exceeds model.num_experts={experts}")
    if experts % p.ep:
        raise ConfigError("parallel.ep", f"ep={p.ep} must divide model.num_experts={experts}")
    for key, choices in _MOE_CHOICES.items():
        if m[key] not in choices:
            raise ConfigError(f"model.{key}", f"must be one of {', '.join(choices)}, got {m[key]!r}")
    if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
        raise ConfigError("model.moe_router_enable_expert_bias",
                          "aux-loss-free expert bias needs model.moe_router_score_function=sigmoid")
    for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        if m[key] is not None:
            width = _positive(cfg, f"model.{key}")
            if width % p.tp:  # experts are tensor-parallel over the same ranks (expert TP = TP)
                raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.{key}={width}")
    factor = m.moe_expert_capacity_factor
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
        raise ConfigError("model.moe_expert_capacity_factor", f"must be null (dropless) or > 0, got {factor!r}")
    groups, group_topk = m.moe_router_num_groups, m.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        raise ConfigError("model.moe_router_num_groups",
                          "group-limited routing needs both moe_router_num_groups and moe_router_group_topk")
    if groups is not None:
        groups, group_topk = _positive(cfg, "model.moe_router_num_groups"), _positive(cfg, "model.moe_router_group_topk")
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
    elif len(freq) != m.num_layers or any(x not in (0, 1) for x in freq):
        raise ConfigError("model.moe_layer_freq", f"a pattern needs one 0/1 entry per layer "
                                                  f"({m.num_layers}), got {list(freq)}")
