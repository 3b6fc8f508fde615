"""LoRA checkpoints (parallel/lora_checkpoint.py) out of ShardForge: merged into their base, or as a
Hugging Face PEFT adapter. Used by `launcher.convert merge_lora` and `export_hf ... peft=true`.

merge_lora: the LoRA model built whole in one process (its base from the base checkpoint, or drawn
from the seed; its adapters from the LoRA checkpoint), each adapted weight replaced by
W + (alpha / rank) B A computed in fp32, the result written as a plain model-only checkpoint with the
base's files (shape, HF config, tokenizer): it trains, generates and exports like any import.

PEFT export: adapter_config.json (LORA, r, lora_alpha, lora_dropout, target_modules) and
adapter_model.safetensors, named as PEFT saves them
(base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight, ...). The fused factors are split
the way export_hf splits their base weights: qkv's B into q/k/v rows (A shared by the three), fc1's B
into gate/up rows. `PeftModel.from_pretrained(<export_hf of the base>, <this dir>)` computes what the
LoRA model does.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from launcher.config.validate import ConfigError
from launcher.model_io import build_model, check_new_root, init_world_of_one, resolve_checkpoint, write_model_checkpoint
from models import hf_mapping as hfm
from models.args import ModelArgs
from models.lora import DENSE_TARGETS, TARGET_MODULES, is_adapter, merge_into_base
from parallel.lora_checkpoint import missing_base, options, read_reference

# target -> the HF projections its factors become, and how its B splits into their rows
_HF_PROJECTIONS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   "proj": ("self_attn.o_proj",), "fc1": ("mlp.gate_proj", "mlp.up_proj"), "fc2": ("mlp.down_proj",)}
_PEFT_PREFIX = "base_model.model.model.layers."


def lora_reference(checkpoint: str, key: str = "checkpoint") -> tuple[Path, dict[str, Any]]:
    """The iter_* directory of a LoRA checkpoint and its reference; ConfigError(key) otherwise."""
    directory = resolve_checkpoint(checkpoint, key)
    reference = read_reference(directory)
    if reference is None:
        raise ConfigError(key, f"{directory} holds no LoRA adapters (no lora.json): a train.peft=lora "
                               f"checkpoint is needed")
    if (missing := missing_base(reference)) is not None:
        raise ConfigError(key, missing)
    return directory, reference


def read_adapters(directory: Path, num_layers: int) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """(target, layer) -> (A, B) whole, from a LoRA checkpoint of any layout (a process group of one must exist)."""
    from megatron.core import dist_checkpointing

    from launcher.convert import _load_full
    from launcher.model_io import layer_tensor_keys

    reference = read_reference(directory)
    meta = dist_checkpointing.load_tensors_metadata(str(directory))
    out = {}
    for target in reference["targets"]:
        factors = []
        for name in ("lora_a", "lora_b"):
            key = f"{hfm.CKPT_LAYER}{TARGET_MODULES[target]}.{name}"
            per_layer = {}
            loaded: dict[str, torch.Tensor] = {}
            for layer, ckpt_key in layer_tensor_keys(meta, key, num_layers):
                if ckpt_key not in loaded:
                    loaded = {ckpt_key: _load_full(directory, meta, ckpt_key)}
                per_layer[layer] = loaded[ckpt_key][layer] if ckpt_key == key else loaded[ckpt_key]
            factors.append(per_layer)
        for layer in range(num_layers):
            out[target, layer] = factors[0][layer], factors[1][layer]
    return out


def merge_lora(checkpoint: str, out: Path) -> Path:
    """Write the LoRA checkpoint's adapters merged into its base as a model-only checkpoint; returns
    <out>/iter_0000000."""
    from launcher.checkpoint_files import HF_CONFIG, HF_GENERATION_CONFIG, find, tokenizer_files
    from parallel.megatron_engine import shutdown

    directory, reference = lora_reference(checkpoint)
    check_new_root(out)
    args = ModelArgs.from_config(reference["base_model"])
    base = Path(reference["base"]) if reference["base"] is not None else None
    init_world_of_one(reference["seed"])
    try:
        lora_model = lora_model_of(directory, reference)
        merge_into_base(lora_model)
        model = build_model(args, params_dtype=lora_model.embedding.word_embeddings.weight.dtype)
        model.load_state_dict({k: v for k, v in lora_model.state_dict().items() if not is_adapter(k)})
        files: dict[str, Any] = {}
        if base is not None:  # the base's HF config and tokenizer (its shape is written anew)
            files = {name: path for name in (HF_CONFIG, HF_GENERATION_CONFIG) if (path := find(base, name)) is not None}
            files.update(tokenizer_files(base))
        return write_model_checkpoint(model, args, out, files=files)
    finally:
        shutdown()


def lora_model_of(directory: Path, reference: dict[str, Any]) -> torch.nn.Module:
    """The LoRA checkpoint `directory`'s model, whole, in its base's dtype (a world of one must exist)."""
    args = ModelArgs.from_config(reference["base_model"])
    base = Path(reference["base"]) if reference["base"] is not None else None
    dtype = _base_dtype(base) if base is not None else getattr(torch, reference["dtype"])
    model = build_model(args, params_dtype=dtype, lora=options(reference))
    load_base_and_adapters(model, directory, base, reference["seed"], args)
    return model


def load_base_and_adapters(model: torch.nn.Module, directory: Path, base: Path | None, seed: int,
                           args: ModelArgs) -> None:
    """A LoRA model (one whole chunk) as training left it: the frozen base from its checkpoint, or
    drawn from the seed, and the adapters from the LoRA checkpoint `directory`."""
    from megatron.core import dist_checkpointing

    from models.init import init_weights

    if base is None:
        init_weights(model, seed=seed, std=args.init_method_std, num_layers=args.num_layers)
    state = model.sharded_state_dict()
    for source, adapters in ((base, False), (directory, True)):
        if source is None:
            continue
        part = {k: v for k, v in state.items() if is_adapter(k) == adapters}
        loaded = dist_checkpointing.load(part, str(source))  # (also the checkpoint's common entries)
        missing, unexpected = model.load_state_dict({k: loaded[k] for k in part}, strict=False)
        left = [k for k in missing if is_adapter(k) == adapters and not k.endswith("_extra_state")]
        if left or unexpected:
            raise ConfigError("checkpoint", f"{source} does not hold this model's tensors: missing {left[:3]}, "
                                            f"unexpected {unexpected[:3]}")


def _base_dtype(base: Path) -> torch.dtype:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(str(base))["embedding.word_embeddings.weight"].dtype


def export_peft(checkpoint: str, out: Path, dtype: torch.dtype | None = None) -> None:
    """Write a Hugging Face PEFT LoRA adapter directory `out` from a LoRA checkpoint."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    directory, reference = lora_reference(checkpoint)
    args = ModelArgs.from_config(reference["base_model"])
    if args.is_moe or not set(reference["targets"]) <= set(DENSE_TARGETS):
        raise ConfigError("checkpoint", "PEFT export covers the adapters of dense models; merge_lora merges any")
    if out.exists() and any(out.iterdir()):
        raise ConfigError("out", f"{out} exists and is not empty")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        adapters = read_adapters(directory, args.num_layers)
    finally:
        dist.destroy_process_group()
    tensors: dict[str, torch.Tensor] = {}
    for (target, layer), (a, b) in adapters.items():
        rows = {"qkv": lambda: hfm.split_qkv(b, args), "fc1": lambda: b.chunk(2, dim=0)}.get(target, lambda: (b,))()
        for projection, b_rows in zip(_HF_PROJECTIONS[target], rows):
            name = f"{_PEFT_PREFIX}{layer}.{projection}"
            for kind, t in (("lora_A", a), ("lora_B", b_rows)):
                tensors[f"{name}.{kind}.weight"] = t.to(dtype or t.dtype).contiguous().clone()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": reference["rank"],
              "lora_alpha": reference["alpha"], "lora_dropout": reference["dropout"],
              "target_modules": sorted(p.rsplit(".", 1)[-1] for t in reference["targets"] for p in _HF_PROJECTIONS[t]),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": None,
              "inference_mode": True}
    final, partial = out, out.with_name(out.name + ".partial")  # renamed once complete
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / "adapter_model.safetensors"), metadata={"format": "pt"})
    (partial / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if final.exists():
        final.rmdir()  # empty (checked above)
    os.replace(partial, final)
