"""DeepSpeed ZeRO-3 checkpoint (`parallel.engine=deepspeed`) -> ShardForge model-only checkpoint.

DeepSpeed's own zero_to_fp32 reassembles the full fp32 weights from every rank's optimizer
partition files (the master weights, not the possibly lower-precision model copy); they are
loaded into the same GPTModel in a world of one and written as a model-only checkpoint, like
`import_hf` does. Peak memory ≈ the fp32 model twice (state dict + model), on CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from launcher.checkpoint import iter_dir_name
from launcher.checkpoint_files import tokenizer_files
from launcher.config.validate import ConfigError
from launcher.model_io import build_model, check_new_root, init_world_of_one, resolve_any, write_model_checkpoint
from models.args import ModelArgs


def zero_to_megatron(checkpoint: str | os.PathLike, out: Path) -> Path:
    """Convert; returns <out>/iter_0000000. Bad input raises ConfigError."""
    from parallel.deepspeed_engine import zero_meta
    from parallel.megatron_engine import shutdown

    directory = resolve_any(checkpoint, "checkpoint")
    meta = zero_meta(directory)
    if meta is None:
        raise ConfigError("checkpoint", f"{directory} is not a DeepSpeed ZeRO-3 checkpoint "
                                        "(written by parallel.engine=deepspeed)")
    if meta["layout"]["tp"] != 1:  # zero_to_fp32 reassembles ZeRO partitions, not TP slices
        raise ConfigError("checkpoint", f"a tp={meta['layout']['tp']} ZeRO-3 checkpoint; conversion supports tp=1 "
                                        "ZeRO-3 checkpoints (train with parallel.tp=1 to convert)")
    check_new_root(out)
    args = ModelArgs.from_config(meta["model_args"])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed's first import: no GPU needed here
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)

    init_world_of_one()
    try:
        model = build_model(args)
        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(state))
        if missing:
            raise ConfigError("checkpoint", f"no weights for {missing[0]} ({len(missing)} missing): "
                                            f"not a model={args.name} checkpoint")
        with torch.no_grad():
            for name, param in params.items():
                if tuple(state[name].shape) != tuple(param.shape):
                    raise ConfigError("checkpoint", f"{name} is {list(state[name].shape)}, "
                                                    f"model={args.name} has {list(param.shape)}")
                param.copy_(state[name])
        # the weights, their shape and the training run's tokenizer
        write_model_checkpoint(model, args, out, files=tokenizer_files(directory))
    finally:
        shutdown()
    return out / iter_dir_name(0)
