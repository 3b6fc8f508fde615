"""Deterministic weight init that gives the same full model in every parallel layout.

megatron-core initializes each rank's shard from that rank's RNG stream, so a TP=2 or PP=2
model differs from the single-process one and loss-parity tests would mean nothing. Here
the init is defined on the *global* tensors of the checkpoint format instead: every local
parameter learns from its sharded_state_dict entry which global tensor (key, layer index)
it belongs to and at which offset; we draw that global tensor from a generator seeded by
(seed, key, layer) and copy out the local slice. Any layout that can load the same
dist_checkpoint therefore starts from identical weights.
"""
from __future__ import annotations

import math
import zlib

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.dict_utils import nested_values

_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def _init_global(key: str, shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
                 std: float, num_layers: int) -> torch.Tensor:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf.endswith("_bias") or leaf == "lora_b":  # (B = 0: a new adapter changes nothing)
        return torch.zeros(shape, device=device)
    if leaf == "lora_a":  # PEFT's default: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(shape[-1])
        return torch.empty(shape, device=device).uniform_(-bound, bound, generator=generator)
    if "norm" in key.rsplit(".", 2)[-2] or "layer_norm" in leaf:
        return torch.ones(shape, device=device)
    if key.endswith(_OUTPUT_PROJECTIONS):
        std = std / math.sqrt(2.0 * num_layers)  # GPT-2 / Megatron scaled init of residual outputs
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)


def local_tensors(model: torch.nn.Module):
    """Every ShardedTensor of the model's sharded_state_dict (factories expanded)."""
    for item in nested_values(model.sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):
            built = item.build_fn(item.key, item.data, item.replica_id, None)
            yield from (t for t in nested_values(built) if isinstance(t, ShardedTensor))
        elif isinstance(item, ShardedTensor):
            yield item


def local_init(sh: ShardedTensor, *, seed: int, std: float, num_layers: int,
               device: torch.device) -> torch.Tensor:
    """The initial values of the local slice `sh` describes, cut from its seeded global tensor.

    Only `sh`'s metadata is read (key, offsets, shapes), so `sh` may come from a meta-device
    twin of the model (DeepSpeed ZeRO-3 init, where parameters hold no data).
    """
    lead = sh.prepend_axis_num
    index = tuple(sh.global_offset[:lead])  # e.g. the global layer number of stacked layer tensors
    generator = torch.Generator(device=device)
    generator.manual_seed(zlib.crc32(f"{seed}|{sh.key}|{index}".encode()))
    full = _init_global(sh.key, tuple(sh.global_shape[lead:]), generator, device, std, num_layers)
    return full[tuple(slice(o, o + n) for o, n in zip(sh.global_offset[lead:], sh.local_shape))]


@torch.no_grad()
def init_weights(model: torch.nn.Module, *, seed: int, std: float, num_layers: int) -> None:
    """Fill every parameter of one model chunk from its layout-independent global tensor.

    Call before wrapping in DDP: parameters must still own their storage (DDP moves them
    into one flat buffer).
    """
    param_storage = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}
    filled: set[int] = set()
    for sh in local_tensors(model):
        data = sh.data
        storage = data.untyped_storage().data_ptr() if data is not None else None
        if storage not in param_storage:
            continue  # buffers and extra state are not trained weights
        data.copy_(local_init(sh, seed=seed, std=std, num_layers=num_layers, device=data.device))
        filled.add(storage)
    missing = [name for ptr, name in param_storage.items() if ptr not in filled]
    if missing:
        raise RuntimeError(f"init_weights: parameters without a sharded_state_dict entry: {missing}")
