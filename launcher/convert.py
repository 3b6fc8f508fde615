"""Hugging Face safetensors ⇄ ShardForge checkpoints (Llama 2/3, Mistral, Qwen2/2.5, Qwen3; MoE: Mixtral,
Qwen2-MoE, Qwen3-MoE), and DeepSpeed ZeRO-3 -> ShardForge.

    python -m launcher.convert import_hf hf_dir=<HF model dir> out=<checkpoint dir>
                               [name=<model name>] [dtype=fp32|bf16] [model.<field>=<value> ...]
    python -m launcher.convert export_hf checkpoint=<checkpoint dir or iter_* dir> out=<HF dir>
                               [tokenizer=<dir or file>] [model=<conf name, yaml or checkpoint>]
                               [architecture=LlamaForCausalLM|MistralForCausalLM|Qwen2ForCausalLM|Qwen3ForCausalLM|
                                             MixtralForCausalLM|Qwen2MoeForCausalLM|Qwen3MoeForCausalLM]
                               [dtype=fp32|bf16|fp16] [max_shard_size_mb=2000]
    python -m launcher.convert export_hf checkpoint=<LoRA checkpoint> out=<dir> peft=true [dtype=...]
    python -m launcher.convert merge_lora checkpoint=<LoRA checkpoint dir or iter_* dir> out=<dir>
    python -m launcher.convert zero_to_megatron checkpoint=<ZeRO-3 checkpoint dir or iter_* dir> out=<dir>
    python -m launcher.convert <command> --help      (the command's keys and their defaults)

A Hydra app like launcher.train: the first argument picks the command (it is the `command`
config group: `command=import_hf` works too), every other key is a field of that command's
structured config below, and an unknown key is an error.

zero_to_megatron turns a `parallel.engine=deepspeed` (ZeRO-3) checkpoint into a model-only ShardForge
checkpoint (same layout as import_hf's), which trains with engine=megatron in any TP/PP layout;
export_hf accepts a ZeRO-3 checkpoint directly (it converts through a temporary directory).

import_hf reads config.json and the (sharded, indexed) safetensors one tensor at a time, fills a
ShardForge model built in a world of one on CPU and writes a model-only dist checkpoint through
launcher/checkpoint.py (`latest` written last, atomically):

    <out>/iter_0000000/   dist_checkpointing (torch_dist); reshards on load, so it loads into any
                          TP/PP layout: `python -m launcher.train model=<out> checkpoint.load=<out>`
      model.yaml          the model shape (`model=<out>` trains it, launcher/model_path.py)
      hf_config.json      the source config.json (export reuses its architecture and token ids)
      hf_generation_config.json  the source's generation_config.json, if it had one
      tokenizer/          the source's tokenizer files, if it had any (generate/export default to them)
    <out>/latest          "iter_0000000"

Memory: import reads HF tensors one at a time, but the model it fills is whole (fp32 by default),
so peak ≈ model size. export reads one checkpoint key at a time (a key holds one weight kind of
every layer, e.g. all fc1 matrices) and writes shards of `max_shard_size_mb`: peak ≈ the largest
key + one output shard.

export_hf needs the model shape: `model=`, else the checkpoint's model.yaml (imports and training
checkpoints carry one, launcher/checkpoint_files.py), else its recorded `model_args`, else the
training run's <root>/../.hydra/config.yaml. It reads only model tensors (never the optimizer state)
and writes safetensors shards + model.safetensors.index.json + config.json + generation_config.json,
and the tokenizer (`tokenizer=`, else the checkpoint's own): tokenizer.json or tokenizer.model, and a
tokenizer_config.json naming bos/eos/pad (and the chat template); their ids go into config.json and
generation_config.json. `transformers.AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load
the directory as it is. Without `architecture=` it reuses the
imported model's, else picks Qwen3 (qk-norm), Qwen2 (qkv bias) or Llama; for MoE models Qwen3-MoE
(qk-norm), Qwen2-MoE (shared expert / qkv bias) or Mixtral. An MoE checkpoint of any expert-parallel
layout exports the same: its expert tensors are stored whole (dist_checkpointing).

LoRA checkpoints (train.peft=lora: adapters and a reference to their base, launcher/lora_convert.py):
merge_lora writes the base with the adapters merged in (fp32) as a model-only checkpoint, which
export_hf then exports as any other; export_hf peft=true writes the adapters alone as a Hugging Face
PEFT adapter (adapter_config.json + adapter_model.safetensors, q/k/v and gate/up split) for the base's
own export_hf.

Bad input (unknown architecture, missing shard or tensor, checkpoint of another shape, ...) prints
one line `convert: error: <key>: ...` and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launcher.checkpoint_files import HF_CONFIG, HF_GENERATION_CONFIG, TOKENIZER_DIR, find
from launcher.cli import hydra_command
from launcher.config.validate import ConfigError
from launcher.model_io import (build_model, check_checkpoint_matches, check_new_root, init_world_of_one,
                               layer_tensor_keys, model_args_for, resolve_any, resolve_checkpoint,
                               write_model_checkpoint)
from models import hf_mapping as hfm
from models.args import ModelArgs
from parallel.lora_checkpoint import REFERENCE

warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|TransformerEngine).*")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def _check_choice(key: str, value: str | None, choices: Mapping[str, Any]) -> None:
    if value is not None and value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}")


# ----------------------------------------------------------------------------------------------
# import_hf


class SafetensorsReader:
    """Tensors of an HF model dir by name, one at a time (model.safetensors or an indexed set of shards)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (hf_dir / "model.safetensors").is_file():
            with safe_open(hf_dir / "model.safetensors", "pt") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        else:
            raise ConfigError("hf_dir", f"{hf_dir} has no model.safetensors or model.safetensors.index.json "
                                        "(only safetensors checkpoints are supported)")
        for file in sorted(set(weight_map.values())):
            if not (hf_dir / file).is_file():
                raise ConfigError("hf_dir", f"shard {file} listed in {hf_dir / index.name} is missing")
        self.hf_dir, self.weight_map = hf_dir, weight_map
        self._open: dict[str, Any] = {}
        self._safe_open = safe_open

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConfigError("hf_dir", f"tensor {name} is missing from {self.hf_dir}")
        file = self.weight_map[name]
        if file not in self._open:  # keep files open (memory-mapped), read tensors lazily
            self._open[file] = self._safe_open(self.hf_dir / file, "pt")
        return self._open[file].get_tensor(name)


def prepare_import(hf_dir: Path, name: str | None, overrides: Mapping[str, Any]) -> tuple[ModelArgs, dict, SafetensorsReader]:
    """Everything that can be wrong with the input, checked before megatron is imported.
    `overrides`: ModelArgs fields to change in the shape read from config.json."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError("hf_dir", f"{hf_dir} has no config.json")
    hf_config = json.loads(config_path.read_text())
    args = hfm.args_from_hf_config(hf_config, name or hf_dir.name.lower().replace("-", "_").replace(".", "_"))
    args = hfm.with_overrides(args, overrides)
    window = hf_config.get("sliding_window")
    if hfm.architecture_of(hf_config) in ("MistralForCausalLM", "MixtralForCausalLM") and window and window < args.max_position_embeddings:
        # Mistral-7B-v0.1 style: full attention equals it on sequences up to the window
        print(f"convert: note: sliding_window={window} is not modeled; ShardForge attends to the full context "
              f"(identical for sequences of up to {window} tokens)", file=sys.stderr)
    reader = SafetensorsReader(hf_dir)
    needed = set(hfm.hf_tensor_names(args, hfm.architecture_of(hf_config)))
    missing = sorted(needed - reader.names())
    if missing:
        raise ConfigError("hf_dir", f"tensor {missing[0]} (and {len(missing) - 1} more) missing in {hf_dir} "
                                    f"for a {args.num_layers}-layer {hfm.architecture_of(hf_config)}")
    extra = sorted(n for n in reader.names() - needed
                   if not n.endswith(_IGNORED_HF_TENSORS) and not (n == "lm_head.weight" and args.tie_word_embeddings))
    if extra:
        raise ConfigError("hf_dir", f"unexpected tensor {extra[0]} ({len(extra)} in all) in {hf_dir}: not a plain "
                                    f"{hfm.architecture_of(hf_config)} of this config")
    return args, hf_config, reader


def import_hf(hf_dir: Path, out: Path, *, name: str | None = None, dtype: str = "fp32",
              overrides: Mapping[str, Any] | None = None) -> Path:
    """Convert; returns <out>/iter_0000000. Bad input raises ConfigError."""
    _check_choice("dtype", dtype, {k: v for k, v in DTYPES.items() if k != "fp16"})
    check_new_root(out)
    try:
        args, hf_config, reader = prepare_import(hf_dir, name, overrides or {})
    except hfm.HFMappingError as err:
        raise ConfigError("hf_dir", str(err)) from err

    from parallel.megatron_engine import shutdown

    init_world_of_one()
    try:
        model = build_model(args, params_dtype=DTYPES[dtype])
        params = dict(model.named_parameters())
        filled: set[str] = set()
        with torch.no_grad():
            for key, tensor in hfm.hf_to_shardforge(reader.get, args, hfm.architecture_of(hf_config)):
                param = params[key]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ConfigError("hf_dir", f"{key} maps to shape {list(tensor.shape)}, model expects "
                                                f"{list(param.shape)} (config.json and tensors disagree)")
                param.copy_(tensor)
                filled.add(key)
        unfilled = sorted(set(params) - filled)
        if unfilled:  # a mapping bug, not bad input
            raise RuntimeError(f"import_hf left parameters unset: {unfilled}")
        files: dict[str, Any] = {HF_CONFIG: json.dumps(hf_config, indent=2).encode()}
        if (hf_dir / "generation_config.json").is_file():
            files[HF_GENERATION_CONFIG] = hf_dir / "generation_config.json"
        found = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
        if {"tokenizer.json", "tokenizer.model"} & set(found):  # a config alone is no tokenizer
            files.update({f"{TOKENIZER_DIR}/{f}": hf_dir / f for f in found})
        return write_model_checkpoint(model, args, out, files=files)
    finally:
        shutdown()


# ----------------------------------------------------------------------------------------------
# export_hf


class ShardWriter:
    """Writes tensors into safetensors files of about `max_bytes` each, then the index."""

    def __init__(self, out: Path, max_bytes: int, dtype: torch.dtype | None):
        self.out, self.max_bytes, self.dtype = out, max_bytes, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        # clone: safetensors refuses tensors that share storage (split views of qkv / fc1)
        tensor = tensor.to(self.dtype or tensor.dtype).contiguous().clone()
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self.files) + 1:05d}.safetensors.tmp"
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / tmp_name, self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _load_full(directory: Path, meta: Mapping[str, Any], key: str) -> torch.Tensor:
    """One whole (global) tensor of a dist checkpoint, whatever layout saved it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    # A single layer's slice cannot be requested in a world of one: megatron's torch_dist loader
    # takes every other slice of the grid for a local one too. So: one stacked key at a time.
    request = {key: ShardedTensor.from_rank_offsets(key, torch.empty(tuple(meta[key].global_shape),
                                                                     dtype=meta[key].dtype), replica_id=0)}
    return dist_checkpointing.load(request, str(directory))[key]


def export_hf(checkpoint: str, out: Path, *, tokenizer: str | None = None, model: str | None = None,
              architecture: str | None = None, dtype: str | None = None, max_shard_size_mb: float = 2000) -> None:
    """Write an HF model directory `out` from a ShardForge (or ZeRO-3) checkpoint. Bad input raises ConfigError."""
    from parallel.deepspeed_engine import zero_meta

    if zero_meta(resolve_any(checkpoint, "checkpoint")) is not None:  # ZeRO-3: through a megatron checkpoint
        import tempfile

        from launcher.zero_convert import zero_to_megatron

        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
            zero_to_megatron(checkpoint, Path(tmp) / "megatron")
            return export_hf(str(Path(tmp) / "megatron"), out, tokenizer=tokenizer, model=model,
                             architecture=architecture, dtype=dtype, max_shard_size_mb=max_shard_size_mb)
    directory = resolve_checkpoint(checkpoint)
    if (directory / REFERENCE).is_file():
        raise ConfigError("checkpoint", f"{directory} holds LoRA adapters: export them with peft=true, or merge them "
                                        f"into their base first (merge_lora checkpoint={checkpoint} out=<dir>)")
    args = model_args_for(directory, model)
    base_file, generation_file = find(directory, HF_CONFIG), find(directory, HF_GENERATION_CONFIG)
    base_config = json.loads(base_file.read_text()) if base_file is not None else {}
    if architecture is None:
        archs = base_config.get("architectures") or []
        architecture = archs[0] if archs else hfm.default_architecture(args)
    try:
        config = hfm.hf_config_from_args(args, architecture, base_config)  # validates architecture vs shape
    except hfm.HFMappingError as err:
        raise ConfigError("architecture", str(err)) from err
    _check_choice("dtype", dtype, DTYPES)
    tokenizer_source = Path(tokenizer) if tokenizer else find(directory, TOKENIZER_DIR)
    tok = _load_tokenizer(tokenizer_source) if tokenizer_source is not None else None
    if out.exists() and any(out.iterdir()):
        raise ConfigError("out", f"{out} exists and is not empty")
    final, out = out, out.with_name(out.name + ".partial")  # renamed once complete
    shutil.rmtree(out, ignore_errors=True)

    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        meta = check_checkpoint_matches(directory, args)
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(out, int(max_shard_size_mb * 2**20), DTYPES[dtype] if dtype else None)
        for key in hfm.checkpoint_global_keys(args):
            writer.add(*hfm.global_to_hf(key, _load_full(directory, meta, key), args))
        for key in hfm.checkpoint_layer_keys(args):
            loaded: dict[str, torch.Tensor] = {}  # a stacked key is read once for all its layers
            for layer, ckpt_key in layer_tensor_keys(meta, key, args.num_layers):
                if ckpt_key not in loaded:
                    loaded = {ckpt_key: _load_full(directory, meta, ckpt_key)}
                tensor = loaded[ckpt_key][layer] if ckpt_key == key else loaded[ckpt_key]
                for name, t in hfm.layer_to_hf(layer, {key: tensor}, args, architecture).items():
                    writer.add(name, t)
            del loaded
        writer.finish()
        ckpt_dtype = meta["embedding.word_embeddings.weight"].dtype
    finally:
        dist.destroy_process_group()
    torch_dtype = str(DTYPES[dtype] if dtype else ckpt_dtype).removeprefix("torch.")
    config.update(dtype=torch_dtype, torch_dtype=torch_dtype)
    if tok is not None:
        _write_tokenizer(tokenizer_source, tok, out)
        for role, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
            if config.get(f"{role}_token_id") is None:  # an imported config's own ids stay
                config[f"{role}_token_id"] = i
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_generation_config(out, config, generation_file)
    if final.exists():
        final.rmdir()  # empty (checked above)
    os.replace(out, final)


def _load_tokenizer(source: Path):
    from launcher.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(source)
    except (OSError, ValueError) as err:
        raise ConfigError("tokenizer", f"{source}: {err}") from err


def _write_tokenizer(source: Path, tok, out: Path) -> None:
    """Tokenizer files into an HF dir, with a tokenizer_config.json that names the special tokens
    (and keeps the chat template), so that transformers.AutoTokenizer loads the tokenizer ShardForge
    trained with. A directory's known files are copied; a bare sentencepiece model (ShardForge's
    default tokenizer) becomes tokenizer.model + a LlamaTokenizer config."""
    from launcher.data.tokenizer import SentencePieceTokenizer

    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
    else:
        for name, path in tok.include_in_checkpoints().items():
            shutil.copy2(path, out / name)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if isinstance(tok, SentencePieceTokenizer):
        # ShardForge's data pipeline adds no BOS/EOS when encoding (launcher.data.tokenizer); legacy=True
        # keeps sentencepiece's own handling of the leading space.
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "legacy": True, **config}
        if tok.unk_id is not None:
            config.setdefault("unk_token", tok.id_to_token(tok.unk_id))
    else:
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for role, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if i is not None:
            config.setdefault(f"{role}_token", tok.id_to_token(i))
    if tok.chat_template is not None and not (out / "chat_template.jinja").is_file():
        config.setdefault("chat_template", tok.chat_template)
    config_file.write_text(json.dumps(config, indent=2))


def _write_generation_config(out: Path, config: Mapping[str, Any], imported: Path | None) -> None:
    """generation_config.json: the imported model's own, else the token ids of config.json (what
    transformers' GenerationConfig.from_model_config takes; greedy, no length limit of ours)."""
    generation = json.loads(imported.read_text()) if imported is not None else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if generation.get(key) is None and config.get(key) is not None:
            generation[key] = config[key]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


# ----------------------------------------------------------------------------------------------
# the command line: one Hydra app, one structured config per command (the `command` group)

# import_hf's model.<field>=<value>: every ModelArgs field, unset unless given
ModelOverrides = dataclasses.make_dataclass(
    "ModelOverrides", [(f.name, Optional[Any], None) for f in dataclasses.fields(ModelArgs)])


@dataclass
class ImportHFConfig:
    hf_dir: Optional[str] = None  # HF model directory: config.json + safetensors (required)
    out: Optional[str] = None  # the new checkpoint root (required; must not hold a checkpoint)
    name: Optional[str] = None  # model name recorded in model.yaml (default: from hf_dir's name)
    dtype: str = "fp32"  # fp32 | bf16: the checkpoint's parameter dtype
    model: ModelOverrides = field(default_factory=ModelOverrides)  # model.<field>=<value>: change a shape field


@dataclass
class ExportHFConfig:
    checkpoint: Optional[str] = None  # checkpoint root or iter_* directory; ZeRO-3 too (required)
    out: Optional[str] = None  # the HF directory to write (required; absent or empty)
    tokenizer: Optional[str] = None  # tokenizer dir or file (default: the checkpoint's own)
    model: Optional[str] = None  # conf/model name, yaml path or checkpoint (default: the checkpoint's shape)
    architecture: Optional[str] = None  # HF architecture (default: the imported one, else from the shape)
    dtype: Optional[str] = None  # fp32 | bf16 | fp16 (default: the checkpoint's)
    max_shard_size_mb: float = 2000  # size of each safetensors shard
    peft: bool = False  # a LoRA checkpoint's adapters as a Hugging Face PEFT adapter (dtype applies; no shards)


@dataclass
class MergeLoraConfig:
    checkpoint: Optional[str] = None  # a train.peft=lora checkpoint root or iter_* directory (required)
    out: Optional[str] = None  # the new checkpoint root (required; must not hold a checkpoint)


@dataclass
class ZeroToMegatronConfig:
    checkpoint: Optional[str] = None  # ZeRO-3 checkpoint root or iter_* directory (required)
    out: Optional[str] = None  # the new checkpoint root (required; must not hold a checkpoint)


def _required(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        if cfg[key] in (None, ""):
            raise ConfigError(key, "required")


def _run_import_hf(cfg: DictConfig) -> None:
    _required(cfg, "hf_dir", "out")
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if v is not None}
    path = import_hf(Path(cfg.hf_dir), Path(cfg.out), name=cfg.name, dtype=cfg.dtype, overrides=overrides)
    print(f"convert: wrote {path} (train it with model={path.parent} checkpoint.load={path.parent})")


def _run_export_hf(cfg: DictConfig) -> None:
    _required(cfg, "checkpoint", "out")
    if cfg.peft:
        from launcher.lora_convert import export_peft

        _check_choice("dtype", cfg.dtype, DTYPES)
        export_peft(cfg.checkpoint, Path(cfg.out), DTYPES[cfg.dtype] if cfg.dtype else None)
        print(f"convert: wrote {cfg.out} (a PEFT LoRA adapter: PeftModel.from_pretrained(<its base>, {cfg.out}))")
        return
    export_hf(cfg.checkpoint, Path(cfg.out), tokenizer=cfg.tokenizer, model=cfg.model, architecture=cfg.architecture,
              dtype=cfg.dtype, max_shard_size_mb=cfg.max_shard_size_mb)
    print(f"convert: wrote {cfg.out}")


def _run_merge_lora(cfg: DictConfig) -> None:
    from launcher.lora_convert import merge_lora

    _required(cfg, "checkpoint", "out")
    path = merge_lora(cfg.checkpoint, Path(cfg.out))
    print(f"convert: wrote {path} (train it with model={path.parent} checkpoint.load={path.parent}, or export_hf it)")


def _run_zero_to_megatron(cfg: DictConfig) -> None:
    from launcher.zero_convert import zero_to_megatron

    _required(cfg, "checkpoint", "out")
    path = zero_to_megatron(cfg.checkpoint, Path(cfg.out))
    print(f"convert: wrote {path} (train it with checkpoint.load={path.parent}, or export_hf it)")


COMMANDS: dict[str, tuple[type, Callable[[DictConfig], None]]] = {
    "import_hf": (ImportHFConfig, _run_import_hf),
    "export_hf": (ExportHFConfig, _run_export_hf),
    "zero_to_megatron": (ZeroToMegatronConfig, _run_zero_to_megatron),
    "merge_lora": (MergeLoraConfig, _run_merge_lora),
}
for _name, (_schema, _) in COMMANDS.items():
    ConfigStore.instance().store(group="command", name=_name, node=_schema, package="_global_")


@hydra_command("convert", config_dir="tools", argv=lambda args: command_argv(args))
def main(cfg: DictConfig) -> None:
    try:
        COMMANDS[HydraConfig.get().runtime.choices["command"]][1](cfg)
    except ConfigError as err:
        print(f"convert: error: {err.key}: {err.reason}", file=sys.stderr)
        sys.exit(2)


def command_argv(argv: list[str]) -> list[str]:
    """`import_hf key=value ...` -> `command=import_hf key=value ...` (Hydra's form of the command).
    No command: the usage (--help) or one error line."""
    if argv and argv[0] in COMMANDS:
        return [f"command={argv[0]}", *argv[1:]]
    if argv and argv[0].startswith("command="):
        return argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    print(f"convert: error: command: the first argument must be one of {', '.join(COMMANDS)}"
          f"{f', got {argv[0]!r}' if argv else ''} (python -m launcher.convert --help)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":  # dist_checkpointing's writer may spawn processes: keep this guard
    main()
