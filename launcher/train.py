"""`python -m launcher.train [overrides]` — the main job: validate → build → train → checkpoint.

Runs as a single process or under torchrun (one process per GPU / CPU rank).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from launcher.config_check import ConfigError, check_config, world_size_from_env

# megatron-core warns at import that TransformerEngine/apex are absent; the torch backend is the
# supported path without them, so these lines are noise on every run.
warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|TransformerEngine).*")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda requested but torch sees no GPU")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def run(cfg: DictConfig) -> None:
    # Everything that can be wrong with the input is checked before a process group starts.
    layout = check_config(cfg, world_size_from_env())
    device = resolve_device(cfg.device)
    params_dtype = resolve_dtype(cfg.train.precision, device)

    from launcher.data.pretrain import TokenChunks, prepare_default_corpus
    from launcher.data.tokenizer import SentencePieceTokenizer

    tokenizer_path, tokens_path = prepare_default_corpus(Path(cfg.data.cache_dir), cfg.data.tokenizer_vocab_size,
                                                         cfg.data.max_corpus_bytes)
    tokenizer = SentencePieceTokenizer(tokenizer_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                                              f"({tokenizer.vocab_size}, {tokenizer_path})")
    dataset = TokenChunks(tokens_path, cfg.train.seq_length, cfg.train.seed)

    from launcher import checkpoint
    from launcher.loop import train
    from models.args import ModelArgs
    from models.specs import default_backend
    from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

    args = ModelArgs.from_config(cfg.model)
    init_distributed(layout, device, cfg.train.seed)
    try:
        engine = MegatronEngine(args, layout, cfg.optim, steps=cfg.train.steps, seq_length=cfg.train.seq_length,
                                micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, device=device,
                                params_dtype=params_dtype, recompute=cfg.train.recompute,
                                backend=default_backend(), distributed_optimizer=cfg.parallel.distributed_optimizer,
                                overlap_grad_reduce=cfg.parallel.overlap_grad_reduce)
        start_step = checkpoint.load(engine, cfg.checkpoint.load) if cfg.checkpoint.load else 0
        if dist.get_rank() == 0:
            params = torch.tensor(engine.num_parameters())
            print(f"shardforge: model={args.name} layout[{layout}] device={device.type} dtype={params_dtype} "
                  f"params/rank(0)={params.item() / 1e6:.1f}M steps={start_step}->{cfg.train.steps} "
                  f"run.dir={cfg.run.dir}", flush=True)
        train(cfg, engine, dataset, args, start_step)
    finally:
        shutdown()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes: keep this guard
    main()
