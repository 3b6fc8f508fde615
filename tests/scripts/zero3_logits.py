"""Under torchrun: logits of the same tokens from (a) a ZeRO-3 checkpoint loaded into the DeepSpeed
engine (parameters partitioned over the ranks, gathered layer by layer in the forward) and (b) its
`launcher.convert zero_to_megatron` output loaded into the megatron GPTModel through
dist_checkpointing, the path the megatron engine loads checkpoints by, and (c) that converted
checkpoint loaded back into a fresh DeepSpeed engine (megatron -> ZeRO-3). Also checks that the ZeRO-3
engine's export_weights equals the converted checkpoint's tensors.

    zero3_logits ZERO_CHECKPOINT MEGATRON_CHECKPOINT OUT.pt OFFLOAD(cpu|none)
OUT.pt (rank 0): {"tokens", "deepspeed", "megatron", "megatron_to_deepspeed"}: [b, s, vocab] logits
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from launcher.checkpoint import resolve
from launcher.model_io import build_model, load_model_weights, model_args_for, resolve_checkpoint
from models.args import ModelArgs
from parallel.deepspeed_engine import DeepSpeedEngine, zero_meta
from parallel.engine_config import OptimConfig, ZeroConfig
from parallel.layout import Layout
from parallel.megatron_engine import init_distributed, shutdown

REPO = Path(__file__).resolve().parents[2]


def _model_tensors_on_disk(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a model-only dist checkpoint, whole."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    meta = dist_checkpointing.load_tensors_metadata(str(directory))
    request = {key: ShardedTensor.from_rank_offsets(key, torch.empty(tuple(m.global_shape), dtype=m.dtype),
                                                    replica_id=torch.distributed.get_rank())
               for key, m in meta.items()}
    loaded = dist_checkpointing.load(request, str(directory))
    return {key: loaded[key] for key in request}


def main() -> None:
    zero_ckpt, megatron_ckpt, out, offload = sys.argv[1:5]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    init_distributed(Layout(world_size=world, dp=world), device, seed=0)
    try:
        directory = resolve(zero_ckpt)
        args = ModelArgs.from_config(zero_meta(directory)["model_args"])
        tokens = torch.randint(0, args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(7))
        zero = ZeroConfig(offload_params=offload, offload_optimizer=offload)

        def fresh_engine(seed: int) -> DeepSpeedEngine:  # another seed: every weight must come from the load
            return DeepSpeedEngine(args, Layout(world_size=world, dp=world), OptimConfig(), zero, steps=1,
                                   seq_length=48, micro_batch_size=2, global_batch_size=2 * world, seed=seed,
                                   device=device, params_dtype=torch.float32, recompute=None, backend="torch")

        engine = fresh_engine(1)
        assert engine.load(directory) > 0
        ds_logits = engine.logits(tokens)

        converted = resolve_checkpoint(megatron_ckpt)
        # export_weights gathers the partitions whole: what zero_to_fp32 reassembled from the files
        exported, on_disk = engine.export_weights(), _model_tensors_on_disk(converted)
        assert sorted(exported) == sorted(on_disk), sorted(set(exported) ^ set(on_disk))
        for key, tensor in on_disk.items():
            assert torch.equal(exported[key], tensor), f"exported {key} differs from the conversion's"
        margs = model_args_for(converted, None)
        model = build_model(margs)
        load_model_weights(model, converted, margs)
        model.eval()
        with torch.no_grad():
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            mg_logits = model(tokens, positions, None)
        engine = fresh_engine(2)
        assert engine.load(converted) == 0  # a megatron checkpoint: its weights, a fresh start
        back_logits = engine.logits(tokens)
        if torch.distributed.get_rank() == 0:
            torch.save({"tokens": tokens, "deepspeed": ds_logits, "megatron": mg_logits,
                        "megatron_to_deepspeed": back_logits}, out)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
