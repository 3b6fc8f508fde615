"""`python -m launcher.evaluate checkpoint.load=<dir> [data keys] [eval.iters=N]` — a checkpoint's validation loss.

Takes the training config (conf/evaluate.yaml: config.yaml plus `evaluate.output`), so it runs
as one process or under torchrun in any layout and engine, and reads the data the training keys
describe: the validation data (data.valid_prefixes, or the documents data.split holds out) when
there is some, else every document of data.prefixes. The loss is the training loop's evaluation
(launcher.loop.evaluate: the first eval.iters batches of train.global_batch_size rows), so with
the run's own data keys it reproduces the run's eval record at the checkpoint's step. Prints the
eval record as one JSON line; `evaluate.output=<path>` also writes it there.

A LoRA checkpoint (train.peft=lora; its lora.json) is evaluated with its adapters on their base
without any lora key: train.peft=lora and the adapters' settings come from the checkpoint
(`with_adapter_settings`).
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from launcher import console
from launcher.cli import hydra_command
from launcher.config.validate import ConfigError, check_fp8_device, validate, world_size_from_env
from launcher.slurm_env import map_srun_env
from launcher.train import build_engine, build_eval_data, resolve_device
from parallel.compat import UnverifiedMegatronVersion


def with_adapter_settings(composed: DictConfig) -> DictConfig:
    """`composed` with its lora keys set: those left unset (null, conf/evaluate.yaml's default) from a
    LoRA checkpoint's lora.json, which also sets train.peft=lora, or from LoraConfig's defaults for
    any other checkpoint. A key set to another value than the adapters were trained with is a
    ConfigError naming it (lora.dropout excepted: evaluation runs without dropout)."""
    from launcher import checkpoint
    from launcher.config.schema import LoraConfig
    from parallel.lora_checkpoint import read_reference

    cfg = copy.deepcopy(composed)
    load = cfg.checkpoint.load
    try:
        saved = read_reference(checkpoint.resolve(cfg.checkpoint.dir if load == "auto" else load)) if load else None
    except FileNotFoundError:
        saved = None  # (validate names what checkpoint.load lacks)
    given = OmegaConf.to_container(cfg.lora, resolve=True)
    for key, default in asdict(LoraConfig()).items():
        theirs = default if saved is None else saved[key]
        if saved is not None and key != "dropout" and given[key] not in (None, theirs):
            raise ConfigError(f"lora.{key}", f"{given[key]} differs from the adapters of checkpoint.load={load} "
                                             f"({theirs}): leave lora.{key} unset to evaluate them")
        cfg.lora[key] = theirs if given[key] is None else given[key]
    if saved is not None and cfg.train.peft == "none":
        cfg.train.peft = "lora"
    return cfg


def run(composed: DictConfig) -> dict:
    map_srun_env()
    composed = with_adapter_settings(composed)
    device = resolve_device(composed.device)
    resolved = validate(composed, world_size_from_env(), device.type, writes_run_dir=False)
    console.configure(resolved.config.logging.verbose)
    cfg, layout = resolved.config, resolved.layout
    if not cfg.checkpoint.load:
        raise ConfigError("checkpoint.load", "required: the checkpoint to evaluate (a checkpoint dir or an iter_* "
                                             "dir; auto: run.dir's own newest)")
    if cfg.train.objective != "lm":
        raise ConfigError("train.objective", f"launcher.evaluate reads LM data; a train.objective="
                                             f"{cfg.train.objective} run evaluates its pairs itself (eval.every, "
                                             f"eval.at_end)")
    check_fp8_device(cfg.train.precision, device)
    valid = build_eval_data(cfg)

    from launcher import checkpoint
    from launcher.loop import evaluate
    from launcher.metrics import eval_record
    from models.args import ModelArgs
    from parallel.megatron_engine import init_distributed, shutdown

    args = ModelArgs.from_config(asdict(cfg.model))
    init_distributed(layout, device, cfg.train.seed)
    rank0 = dist.get_rank() == 0
    try:
        engine = build_engine(cfg, args, layout, device)
        step = checkpoint.load(engine, cfg.checkpoint.load)
        loss_sum, num_tokens = evaluate(engine, valid.microbatches, iters=cfg.eval.iters,
                                        micro_batch_size=cfg.train.micro_batch_size,
                                        global_batch_size=cfg.train.global_batch_size)
    finally:
        shutdown()
    record = eval_record(step, loss_sum=loss_sum, num_tokens=num_tokens)
    if rank0:
        print(json.dumps(record), flush=True)
        if cfg.evaluate.output:
            Path(cfg.evaluate.output).write_text(json.dumps(record) + "\n")
    return record


@hydra_command("evaluate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UnverifiedMegatronVersion as err:
        print(err, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # dist_checkpointing's reader may spawn processes: keep this guard
    main()
