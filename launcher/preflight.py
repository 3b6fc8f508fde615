"""Start-up checks of the machine a run writes to, before any process group or model exists: what
would otherwise fail only at the first save (hours in, with `checkpoint.save_every: 0` at the
end) fails in a second with one line naming the key.

- run.dir and checkpoint.dir: created and probed with a file written and removed;
- checkpoint.dir's file system: room for one checkpoint (parameters x bytes of the weights and of
  the optimizer's fp32 state);
- data.tokenizer: the file or directory exists.

Rank 0 runs them (launcher/train.py); the other ranks meet its verdict at the first collective.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from launcher.config.schema import JobConfig
from launcher.config.validate import ConfigError
from models.args import ModelArgs

# Bytes per parameter the optimizer adds to a checkpoint: fp32 main weights and Adam's two moments.
OPTIMIZER_BYTES = 12


def check(cfg: JobConfig, args: ModelArgs, param_bytes: int) -> None:
    """Every start-up check of `cfg` for a model of shape `args` with `param_bytes`-byte weights."""
    writable("run.dir", cfg.run.dir)
    writable("checkpoint.dir", cfg.checkpoint.dir)
    if cfg.checkpoint.final_save or cfg.checkpoint.save_every:
        room_for_checkpoint(cfg.checkpoint.dir, checkpoint_bytes(args, param_bytes))
    tokenizer = getattr(cfg.data, "tokenizer", None)
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ConfigError("data.tokenizer", f"no tokenizer at {tokenizer} (a sentencepiece .model, a tokenizer.json "
                                            f"or a directory holding one)")


def writable(key: str, directory: str | os.PathLike) -> None:
    """`directory` exists or can be created, and a file can be written in it."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise ConfigError(key, f"{directory} is not writable: {err.strerror or err}") from None


def num_parameters(args: ModelArgs) -> int:
    """The model's parameters (all experts counted; norms and biases left out: they are few)."""
    head_dim = args.kv_channels or args.hidden_size // args.num_attention_heads
    attention = args.hidden_size * head_dim * (2 * args.num_attention_heads + 2 * args.num_query_groups)
    dense_mlp = 3 * args.hidden_size * args.ffn_hidden_size
    moe_mlp = 0
    if args.is_moe:
        expert = 3 * args.hidden_size * (args.moe_ffn_hidden_size or args.ffn_hidden_size)
        shared = 3 * args.hidden_size * (args.moe_shared_expert_intermediate_size or 0)
        moe_mlp = args.num_experts * expert + shared + args.hidden_size * args.num_experts
    layers = sum(attention + (moe_mlp if moe else dense_mlp) for moe in args.moe_layer_pattern())
    embeddings = args.padded_vocab_size * args.hidden_size * (1 if args.tie_word_embeddings else 2)
    return layers + embeddings


def checkpoint_bytes(args: ModelArgs, param_bytes: int) -> int:
    """About the size of one full checkpoint: weights and optimizer state."""
    return num_parameters(args) * (param_bytes + OPTIMIZER_BYTES)


def room_for_checkpoint(directory: str | os.PathLike, needed: int) -> None:
    """The file system of `directory` has `needed` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ConfigError("checkpoint.dir", f"{directory} has {_gib(free)} free, a checkpoint of this model needs "
                                            f"about {_gib(needed)}: free space or point checkpoint.dir elsewhere")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
