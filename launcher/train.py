"""`python -m launcher.train [overrides]` — the main job: validate → build → train → checkpoint.

Runs as a single process or under torchrun (one process per GPU / CPU rank).
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from launcher import console
from launcher.cli import hydra_command
from launcher.config.schema import JobConfig
from launcher.config.validate import (ConfigError, check_fp8_device, validate, validation_bookends,
                                      world_size_from_env)
from launcher.slurm_env import map_srun_env, restart_count
from parallel.compat import UnverifiedMegatronVersion

if TYPE_CHECKING:
    from launcher.data.split import Bookends
    from models.args import ModelArgs
    from models.lora import LoraOptions
    from parallel.engine import Engine
    from parallel.layout import Layout
    from launcher.data.tokenizer import Tokenizer
    from launcher.data.training_data import TrainingData
    from launcher.loop import TrainData
    from parallel.preference_loss import ObjectiveConfig

# megatron-core warns at import that TransformerEngine/apex are absent; the torch backend is the
# supported path without them, so these lines are noise on every run.
warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|TransformerEngine).*")


def resolve_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda requested but torch sees no GPU")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.float32 if precision == "fp32" else torch.bfloat16  # fp8: bf16 params, fp8 GEMMs


def build_data(cfg: JobConfig) -> TrainData:
    """The micro-batch streams `data.*` asks for: training, and validation when there is validation
    data and an evaluation to read it (eval.every / eval.at_end). Bad data paths, a tokenizer/model
    vocab mismatch or a validation stream too short for eval.iters raise ConfigError here, before
    any process group exists."""
    from launcher.loop import TrainData

    d = cfg.data
    prefixes, tokenizer, source_seeds = _sources(cfg)
    if cfg.train.objective != "lm":
        return _preference_data(cfg, prefixes, tokenizer)
    train_part, valid_part = validation_bookends(cfg)
    stream = _stream(cfg, prefixes, tokenizer, source_seeds, train_part, "data")
    valid = None
    if (cfg.eval.every or cfg.eval.at_end) and (d.valid_prefixes or valid_part is not None):
        valid = build_eval_data(cfg, (prefixes, tokenizer, source_seeds))
    return TrainData(stream.microbatches, stream.step_stats, tokenizer,
                     valid.microbatches if valid is not None else None)


def _preference_data(cfg: JobConfig, prefixes: list[str], tokenizer: Tokenizer) -> TrainData:
    """Whole pairs of the preference datasets per micro batch (launcher/data/preference_batches.py), and
    the validation pairs (data.split's held-out part or data.valid_prefixes) when the run evaluates."""
    from launcher.loop import TrainData

    d, e = cfg.data, cfg.eval
    train_part, valid_part = validation_bookends(cfg)
    batches = _pair_batches(cfg, prefixes, tokenizer, "data.prefixes", train_part)
    valid = None
    if (e.every or e.at_end) and (d.valid_prefixes or valid_part is not None):
        if d.valid_prefixes:
            _check_files(list(d.valid_prefixes), "data.valid_prefixes")
            valid = _pair_batches(cfg, list(d.valid_prefixes), tokenizer, "data.valid_prefixes", None)
        else:
            valid = _pair_batches(cfg, prefixes, tokenizer, "data.split", valid_part)
        units, have = ("rows", len(valid.rows)) if d.packing else ("pairs", len(valid))
        need = e.iters * (cfg.train.global_batch_size if d.packing else cfg.train.global_batch_size // 2)
        if need > have:
            raise ConfigError("eval.iters", f"{e.iters} batches of {cfg.train.global_batch_size} rows need {need} "
                                            f"held-out {units}; the validation pairs hold {have}")
    return TrainData(batches.microbatches, batches.step_stats, tokenizer, valid.microbatches if valid else None,
                     preference=batches, valid_preference=valid)


def _pair_batches(cfg: JobConfig, prefixes: list[str], tokenizer: Tokenizer, key: str, part: Bookends | None):
    """The batcher of the usable pairs of datasets `prefixes` (one after the other; of each its data.split
    `part`, all by default); `key` names the data in errors."""
    from launcher.data.indexed import IndexedDataset
    from launcher.data.preference import ConcatenatedPairs, PreferencePairs
    from launcher.data.preference_batches import PackedPreferenceBatches, PreferenceBatches
    from launcher.data.split import document_range
    from launcher.data.tokenizer import fill_id

    packed = bool(cfg.data.packing)
    parts = []
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        documents = document_range(part, len(dataset) // 2) if part is not None else None  # a pair: a document
        try:
            parts.append(PreferencePairs(dataset, cfg.train.seq_length, packed=packed, documents=documents))
        except ValueError as err:
            raise ConfigError(key, str(err)) from err
        if int(dataset.tokens.max(initial=0)) >= tokenizer.vocab_size:
            raise ConfigError(key, f"{prefix} holds token ids outside tokenizer {tokenizer.path}'s "
                                   f"vocabulary of {tokenizer.vocab_size}")
    pairs = parts[0] if len(parts) == 1 else ConcatenatedPairs(parts)
    if packed:
        return PackedPreferenceBatches(pairs, cfg.train.seq_length, cfg.train.seed, fill_id(tokenizer),
                                       cfg.data.packing_algorithm)
    return PreferenceBatches(pairs, cfg.train.seq_length, cfg.train.seed, fill_id(tokenizer))


def objective_config(cfg: JobConfig) -> ObjectiveConfig:
    """train.objective and its keys as the engine's typed objective."""
    from parallel.preference_loss import ObjectiveConfig

    name = cfg.train.objective
    if name == "dpo":
        d = cfg.dpo
        return ObjectiveConfig(name, beta=d.beta, dpo_loss=d.loss, label_smoothing=d.label_smoothing,
                               sft_weight=d.sft_weight, live_reference=d.reference == "live")
    if name == "simpo":
        s = cfg.simpo
        return ObjectiveConfig(name, beta=s.beta, gamma=s.gamma, label_smoothing=s.label_smoothing,
                               sft_weight=s.sft_weight)
    if name == "orpo":
        return ObjectiveConfig(name, beta=cfg.orpo.beta, orpo_nll=cfg.orpo.nll)
    return ObjectiveConfig(name)


def reference_file(cfg: JobConfig, batches) -> Path:
    """Where a dpo.reference=precomputed run keeps the reference log-probs of a batcher's pairs
    (launcher/data/reference_logps.py)."""
    from launcher.data.reference_logps import reference_path

    return reference_path(cfg.run.dir, batches.pairs.sources(), cfg.train.seq_length, packed=bool(cfg.data.packing))


def build_eval_data(cfg: JobConfig, sources: tuple[list[str], Tokenizer, list[int] | None] | None = None
                    ) -> TrainingData:
    """The evaluation stream: data.valid_prefixes, else data.split's held-out documents, else (for
    launcher.evaluate) every document of the data. ConfigError when it cannot fill eval.iters."""
    prefixes, tokenizer, source_seeds = sources or _sources(cfg)
    _, valid_part = validation_bookends(cfg)
    if cfg.data.valid_prefixes:
        _check_files(list(cfg.data.valid_prefixes), "data.valid_prefixes")
        return validation_stream(cfg, list(cfg.data.valid_prefixes), tokenizer, None, None, "data.valid_prefixes")
    if valid_part is not None:
        return validation_stream(cfg, prefixes, tokenizer, source_seeds, valid_part, "data.split")
    return validation_stream(cfg, prefixes, tokenizer, source_seeds, None, "data.prefixes")


def _sources(cfg: JobConfig) -> tuple[list[str], Tokenizer, list[int] | None]:
    """The training datasets' prefixes (the default corpus built on first use), their tokenizer
    (checked against the model's vocabulary) and the per-source seeds."""
    from launcher.data.tokenizer import load_tokenizer

    d, t = cfg.data, cfg.train
    if d.name == "stdlib_docs":  # the built-in corpus, built (once) as an indexed dataset
        from launcher.data.pretrain import prepare_default_corpus

        tokenizer_path, prefix = prepare_default_corpus(Path(d.cache_dir), d.tokenizer_vocab_size, d.max_corpus_bytes)
        # Seeded by the run seed itself, not hash_seed(seed, 0): the order this corpus has always been read in.
        prefixes, source_seeds = [str(prefix)], [t.seed]
    else:
        prefixes, tokenizer_path, source_seeds = list(d.prefixes), d.tokenizer, None
    _check_files(prefixes, "data.prefixes")
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as err:
        raise ConfigError("data.tokenizer", str(err)) from err
    _check_vocab(tokenizer, cfg.model.vocab_size)
    return prefixes, tokenizer, source_seeds


def _check_files(prefixes: list[str], key: str) -> None:
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(f"{prefix}{suffix}").is_file():
                raise ConfigError(key, f"missing {prefix}{suffix} (run python -m launcher.preprocess)")


def _stream(cfg: JobConfig, prefixes: list[str], tokenizer: Tokenizer, source_seeds: list[int] | None,
            documents: Bookends | None, key: str) -> TrainingData:
    from launcher.data.training_data import build_training_data

    d, t = cfg.data, cfg.train
    try:
        return build_training_data(
            prefixes, tokenizer, seq_length=t.seq_length, seed=t.seed, format=d.format,
            weights=list(d.weights) if d.weights is not None else None, packing=d.packing,
            packing_algorithm=d.packing_algorithm, reset_position_ids=d.reset_position_ids,
            reset_attention_mask=d.reset_attention_mask, eod_mask_loss=d.eod_mask_loss, blend_block=d.blend_block,
            source_seeds=source_seeds, documents=documents)
    except ValueError as err:
        raise ConfigError(key, str(err)) from err


def validation_stream(cfg: JobConfig, prefixes: list[str], tokenizer: Tokenizer, source_seeds: list[int] | None,
                      documents: Bookends | None, key: str) -> TrainingData:
    """The evaluation stream: its first eval.iters global batches, the same at every evaluation.
    A stream that would have to repeat samples to fill them is a config error."""
    stream = _stream(cfg, prefixes, tokenizer, source_seeds, documents, key)
    need, have = cfg.eval.iters * cfg.train.global_batch_size, stream.distinct_samples()
    if need > have:
        raise ConfigError("eval.iters", f"{cfg.eval.iters} batches of {cfg.train.global_batch_size} rows need {need} "
                                        f"held-out samples; the validation data ({key}) holds {have}")
    return stream


def _check_vocab(tokenizer, model_vocab_size: int) -> None:
    from launcher.data.tokenizer import check_vocab_size

    try:
        check_vocab_size(tokenizer, model_vocab_size)
    except ValueError as err:
        raise ConfigError("model.vocab_size", str(err)) from err


def prepare_run_dir(cfg: JobConfig, params_dtype: torch.dtype) -> None:
    """Rank 0, before any process group: the start-up checks (launcher/preflight.py), then, for
    run.overwrite=true, the previous run in run.dir moved aside."""
    from launcher import preflight, run_dir
    from models.args import ModelArgs

    preflight.check(cfg, ModelArgs.from_config(asdict(cfg.model)), params_dtype.itemsize)
    steps = run_dir.previous_run(cfg.run.dir, cfg.checkpoint.dir) if cfg.run.overwrite else None
    if steps is not None:
        aside = run_dir.move_aside(cfg.run.dir, cfg.checkpoint.dir)
        print(f"shardforge: run.overwrite: the previous run in {cfg.run.dir} ({steps} steps) moved to {aside}",
              flush=True)


def build_engine(cfg: JobConfig, args: ModelArgs, layout: Layout, device: torch.device, *,
                 graphed: bool = False) -> Engine:
    """The engine `parallel.engine` names, built for this rank (process groups must be up)."""
    from models.kernel_provider import default_backend

    params_dtype = resolve_dtype(cfg.train.precision, device)
    fp8 = cfg.train.precision == "fp8"
    if cfg.parallel.engine == "deepspeed":  # the one place that picks the engine
        from parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(args, layout, cfg.optim, cfg.parallel.zero, steps=cfg.train.steps,
                               seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                               global_batch_size=cfg.train.global_batch_size, seed=cfg.train.seed,
                               device=device, params_dtype=params_dtype, recompute=cfg.train.recompute,
                               backend=default_backend(),
                               keep_saved_schedule=cfg.checkpoint.keep_saved_schedule,
                               objective=objective_config(cfg))
    from parallel.megatron_engine import MegatronEngine

    return MegatronEngine(args, layout, cfg.optim, steps=cfg.train.steps, seq_length=cfg.train.seq_length,
                          micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, device=device,
                          params_dtype=params_dtype, recompute=cfg.train.recompute,
                          # fp8 and the cp_mode attentions are the torch backend's
                          backend="torch" if fp8 or layout.cp > 1 or cfg.train.peft != "none" else default_backend(),
                          cp_mode=cfg.parallel.cp_mode, moe_dispatch=cfg.train.moe_dispatch,
                          attention_backend=cfg.train.attention_backend,
                          distributed_optimizer=cfg.parallel.distributed_optimizer,
                          overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                          compile=cfg.train.compile,
                          cuda_graph=graphed, fp8=fp8,
                          keep_saved_schedule=cfg.checkpoint.keep_saved_schedule,
                          objective=objective_config(cfg), lora=lora_options(cfg),
                          offload_activations=cfg.train.offload_activations)


def lora_options(cfg: JobConfig) -> LoraOptions | None:
    """train.peft=lora's adapters, or None."""
    if cfg.train.peft != "lora":
        return None
    from models.lora import LoraOptions

    lora = cfg.lora
    return LoraOptions(rank=lora.rank, alpha=float(lora.alpha), dropout=float(lora.dropout),
                       targets=tuple(lora.targets), base_fp8=lora.base_fp8)



def check_before_hydra(composed: DictConfig) -> None:
    """Before Hydra creates run.dir: the whole config, and a run.dir this process can write."""
    map_srun_env()  # an srun task (cluster.launcher=srun): RANK/WORLD_SIZE/... from SLURM_PROCID/...
    validate(composed, world_size_from_env(), resolve_device(composed.device).type)
    from launcher.preflight import writable

    writable("run.dir", composed.run.dir)


def run(composed: DictConfig) -> None:
    map_srun_env()
    # Everything that can be wrong with the input is checked before a process group starts.
    device = resolve_device(composed.device)
    resolved = validate(composed, world_size_from_env(), device.type)
    console.configure(resolved.config.logging.verbose)
    cfg, layout, graphed = resolved.config, resolved.layout, resolved.cuda_graph
    check_fp8_device(cfg.train.precision, device)
    params_dtype = resolve_dtype(cfg.train.precision, device)
    rank0 = os.environ.get("RANK", "0") == "0"
    if resolved.start_step >= cfg.train.steps:
        if rank0:
            print(f"shardforge: nothing to train: {cfg.checkpoint.load} is at step {resolved.start_step} and "
                  f"train.steps={cfg.train.steps} (raise train.steps to train on)", flush=True)
        return
    if rank0:
        prepare_run_dir(cfg, params_dtype)

    data = build_data(cfg)
    live = cfg.train.objective == "dpo" and cfg.dpo.reference == "live"
    # DPO's precomputed reference: a table for the training pairs and one for the validation pairs
    references = [(b, reference_file(cfg, b)) for b in (data.preference, data.valid_preference)
                  if b is not None] if cfg.train.objective == "dpo" and not live else []
    for _, reference in references:
        if resolved.start_step > 0 and not reference.is_file():
            raise ConfigError("dpo.reference", f"resuming at step {resolved.start_step} needs {reference}, which "
                                               f"this run's start computes from its initial weights; it is missing")

    from launcher import checkpoint
    from launcher.loop import train
    from launcher.profiling import record_memory_history
    from models.args import ModelArgs
    from parallel.megatron_engine import init_distributed, shutdown

    args = ModelArgs.from_config(asdict(cfg.model))
    init_distributed(layout, device, cfg.train.seed, cuda_graph=graphed)
    record_memory_history(cfg.logging.memory_snapshot, device, enabled=dist.get_rank() == 0)
    try:
        engine = build_engine(cfg, args, layout, device, graphed=graphed)
        start_step = checkpoint.load(engine, cfg.checkpoint.load) if cfg.checkpoint.load else 0
        if live and start_step == 0:  # (a resume reads the reference from its checkpoint)
            engine.freeze_reference()  # type: ignore[attr-defined]
        for batches, reference in references:
            from launcher import preference_reference

            preference_reference.attach(engine, batches, reference, micro_batch_size=cfg.train.micro_batch_size,
                                        fresh_start=start_step == 0)
        if dist.get_rank() == 0:
            params = torch.tensor(engine.num_parameters())
            print(f"shardforge: model={args.name} layout[{layout}] device={device.type} dtype={params_dtype} "
                  f"params/rank(0)={params.item() / 1e6:.1f}M steps={start_step}->{cfg.train.steps} "
                  f"run.dir={cfg.run.dir}{' cuda_graph=on' if graphed else ''}{_lora_note(engine)}{_restart_note()}",
                  flush=True)
        train(cfg, engine, data, args, start_step)
    finally:
        shutdown()


def _lora_note(engine: Engine) -> str:
    lora = getattr(engine, "lora", None)
    if lora is None:
        return ""
    return f" peft=lora rank={lora.rank} trainable/rank(0)={engine.num_trainable_parameters() / 1e6:.3f}M"


def _restart_note() -> str:
    n = restart_count()  # a requeued Slurm job counts its restarts
    return "" if n is None else f" slurm_job={os.environ['SLURM_JOB_ID']} slurm_restart_count={n}"


@hydra_command("config", preflight=check_before_hydra)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UnverifiedMegatronVersion as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves on it): nothing to save
        print("shardforge: interrupted outside the training steps: no checkpoint saved for it", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes: keep this guard
    main()
