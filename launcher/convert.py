"""Hugging Face safetensors ⇄ ShardForge checkpoints (Llama 2/3, Mistral, Qwen2/2.5, Qwen3; MoE: Mixtral,
Qwen2-MoE, Qwen3-MoE).

    python -m launcher.convert import_hf hf_dir=<HF model dir> out=<checkpoint dir>
                               [name=<model name>] [dtype=fp32|bf16] [model.<field>=<value> ...]
    python -m launcher.convert export_hf checkpoint=<checkpoint dir or iter_* dir> out=<HF dir>
                               [tokenizer=<dir or file>] [model=<conf name or yaml>]
                               [architecture=LlamaForCausalLM|MistralForCausalLM|Qwen2ForCausalLM|Qwen3ForCausalLM|
                                             MixtralForCausalLM|Qwen2MoeForCausalLM|Qwen3MoeForCausalLM]
                               [dtype=fp32|bf16|fp16] [max_shard_size_mb=2000]
    python -m launcher.convert zero_to_megatron checkpoint=<ZeRO-3 checkpoint dir or iter_* dir> out=<dir>

zero_to_megatron turns a `parallel.engine=deepspeed` (ZeRO-3) checkpoint into a model-only ShardForge
checkpoint (same layout as import_hf's), which trains with engine=megatron in any TP/PP layout;
export_hf accepts a ZeRO-3 checkpoint directly (it converts through a temporary directory).

import_hf reads config.json and the (sharded, indexed) safetensors one tensor at a time, fills a
ShardForge model built in a world of one on CPU and writes a model-only dist checkpoint:

    <out>/iter_0000000/   dist_checkpointing (torch_dist); reshards on load, so it loads into any
                          TP/PP layout: `python -m launcher.train checkpoint.load=<out> model=<name>`
    <out>/latest          "iter_0000000"
    <out>/model.yaml      the model shape; copy it to conf/model/<name>.yaml to train with model=<name>
    <out>/hf_config.json  the source config.json (export reuses its architecture and token ids)
    <out>/tokenizer/      the source's tokenizer files, if it had any (generate/export default to them)

Memory (not yet one shard at a time): import reads HF tensors one at a time, but the model it
fills is whole (fp32 by default), so peak ≈ model size. export reads one checkpoint key at a time
(a key holds one weight kind of every layer, e.g. all fc1 matrices) and writes shards of
`max_shard_size_mb`: peak ≈ the largest key + one output shard.

export_hf needs the model shape: `model=`, else the checkpoint's recorded `model_args` (imports and
training checkpoints), else <root>/model.yaml, else the training run's <root>/../.hydra/config.yaml. It reads only model tensors (never the optimizer state) and
writes safetensors shards + model.safetensors.index.json + config.json (+ tokenizer files) that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Without `architecture=` it reuses the
imported model's, else picks Qwen3 (qk-norm), Qwen2 (qkv bias) or Llama; for MoE models Qwen3-MoE (qk-norm),
Qwen2-MoE (shared expert / qkv bias) or Mixtral. An MoE checkpoint of any expert-parallel layout exports the
same: its expert tensors are stored whole (dist_checkpointing).

Bad input (unknown architecture, missing shard or tensor, checkpoint of another shape, ...) prints
one line `convert: error: ...` and exits with status 2.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import yaml

from models.args import ModelArgs
from models import hf_mapping as hfm

warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|TransformerEngine).*")

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_ITER = "iter_0000000"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


class CliError(ValueError):
    """Bad input; the message is the one line the user sees."""


def parse_overrides(argv: list[str], allowed: Mapping[str, Any], prefixes: tuple[str, ...] = ()) -> dict[str, Any]:
    """`key=value` arguments -> dict over `allowed` (their defaults). Values stay strings (an empty
    value means None); keys starting with one of `prefixes` (e.g. 'model.') pass through, parsed as
    YAML scalars (numbers, true/false, null)."""
    out = dict(allowed)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise CliError(f"expected key=value, got {arg!r}")
        if key not in allowed and not key.startswith(prefixes):
            raise CliError(f"unknown key {key!r} (known: {', '.join(allowed)}{''.join(' ' + p + '*' for p in prefixes)})")
        out[key] = _scalar(value) if key.startswith(prefixes) and key not in allowed else (value or None)
    return out


def _scalar(value: str) -> Any:
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return parsed if isinstance(parsed, (int, float, bool)) or parsed is None else value


def _require(opts: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        if opts.get(key) in (None, ""):
            raise CliError(f"missing required argument {key}=...")


# ----------------------------------------------------------------------------------------------
# world of one, model construction and model-only checkpoint loading (also used by generate)


def init_world_of_one(seed: int = 0) -> None:
    """gloo process group + megatron parallel state with a single rank, on CPU."""
    from parallel.layout import Layout
    from parallel.megatron_engine import init_distributed

    init_distributed(Layout(world_size=1), torch.device("cpu"), seed)


def build_model(args: ModelArgs, *, tp: int = 1, ep: int = 1, params_dtype: torch.dtype = torch.float32):
    """One whole-model GPTModel chunk (pp=1) on CPU; parallel state must be initialized."""
    from models.llama import build_llama, transformer_config

    config = transformer_config(args, tp=tp, pp=1, vpp=None, params_dtype=params_dtype, on_cpu=True, recompute=None,
                                ep=ep)
    return build_llama(args, config, pre_process=True, post_process=True)  # (CPU, torch backend)


def checkpoint_root(directory: Path) -> Path:
    """The directory holding `latest` (the parent of an iter_* directory)."""
    return directory.parent if directory.name.startswith("iter_") else directory


def _resolve_any(path: str | os.PathLike) -> Path:
    from launcher.checkpoint import resolve

    try:
        return resolve(path)
    except FileNotFoundError as err:
        raise CliError(str(err)) from err


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    from launcher.checkpoint import resolve

    try:
        directory = resolve(path)
    except FileNotFoundError as err:
        raise CliError(str(err)) from err
    if not (directory / "metadata.json").is_file():
        raise CliError(f"checkpoint {directory}: not a complete dist checkpoint (no metadata.json)")
    return directory


def model_args_for(directory: Path, model: str | None) -> ModelArgs:
    """Model shape of a checkpoint: `model` (conf/model name or yaml path), else the `model_args` the
    checkpoint records, else <root>/model.yaml, else the training run's Hydra config next to it."""
    root = checkpoint_root(directory)
    candidates: list[tuple[Path, str | None]] = []
    if model:
        path = Path(model) if model.endswith((".yaml", ".yml")) else REPO / "conf" / "model" / f"{model}.yaml"
        if not path.is_file():
            raise CliError(f"model={model}: no such model config ({path})")
        candidates = [(path, None)]
    else:
        candidates = [(root / "model.yaml", None), (root.parent / ".hydra" / "config.yaml", "model")]
        from megatron.core import dist_checkpointing

        saved = dist_checkpointing.load_common_state_dict(str(directory)).get("model_args")
        if saved is not None:  # training checkpoints (and imports) record their shape
            return ModelArgs.from_config(saved)
    for path, section in candidates:
        if path.is_file():
            cfg = yaml.safe_load(path.read_text())
            cfg = cfg[section] if section else cfg
            try:
                return ModelArgs.from_config(cfg)
            except TypeError as err:
                raise CliError(f"{path}: not a model config ({err})") from err
    raise CliError(f"checkpoint {directory}: cannot tell the model shape (no {root / 'model.yaml'} and no "
                   f"training run config); pass model=<conf/model name or yaml path>")


def expected_shapes(args: ModelArgs) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[tuple[int, ...], list[int]]]]:
    """Global shapes of the model tensors in a ShardForge dist checkpoint of this shape: (whole-model
    keys -> shape, per-layer key suffix -> (shape of one layer's tensor, the layers that hold it))."""
    d = hfm.head_dim(args)
    h = args.hidden_size
    qkv_rows = (args.num_attention_heads + 2 * args.num_query_groups) * d
    shapes = {"embedding.word_embeddings.weight": (args.padded_vocab_size, h), "decoder.final_layernorm.weight": (h,)}
    if not args.tie_word_embeddings:
        shapes["output_layer.weight"] = (args.padded_vocab_size, h)
    pattern = args.moe_layer_pattern()
    every, dense = list(range(args.num_layers)), [i for i, moe in enumerate(pattern) if not moe]
    layer = {
        "self_attention.linear_qkv.layer_norm_weight": ((h,), every),
        "mlp.linear_fc1.layer_norm_weight": ((h,), every),
        "self_attention.linear_qkv.weight": ((qkv_rows, h), every),
        "self_attention.linear_proj.weight": ((h, args.num_attention_heads * d), every),
    }
    if dense:
        layer["mlp.linear_fc1.weight"] = ((2 * args.ffn_hidden_size, h), dense)
        layer["mlp.linear_fc2.weight"] = ((h, args.ffn_hidden_size), dense)
    if args.is_moe:
        from models.hf_moe_mapping import moe_checkpoint_shapes

        moe = [i for i, on in enumerate(pattern) if on]
        layer.update({suffix: (shape, moe) for suffix, shape in moe_checkpoint_shapes(args).items()})
    if args.add_qkv_bias:
        layer["self_attention.linear_qkv.bias"] = ((qkv_rows,), every)
    if args.qk_layernorm:
        layer["self_attention.q_layernorm.weight"] = ((d,), every)
        layer["self_attention.k_layernorm.weight"] = ((d,), every)
    return shapes, layer


def layer_tensor_keys(meta: Mapping[str, Any], key: str, num_layers: int) -> list[tuple[int, str]]:
    """(layer, checkpoint key) holding per-layer `key` (decoder.layers.<rest>): the key itself, stacked
    over layers, when every layer has the same modules; else decoder.layers.{i}.<rest> per layer that
    has it (megatron's non-homogeneous layout, e.g. an MoE model with dense layers)."""
    if key in meta:
        return [(i, key) for i in range(num_layers)]
    rest = key[len(hfm.CKPT_LAYER):]
    return [(i, k) for i in range(num_layers) if (k := f"{hfm.CKPT_LAYER}{i}.{rest}") in meta]


def check_checkpoint_matches(directory: Path, args: ModelArgs) -> dict[str, Any]:
    """Raise CliError unless the checkpoint holds exactly the model tensors of `args`; returns the
    checkpoint's tensor metadata (key -> ShardedTensor without data)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(directory))
    whole, per_layer = expected_shapes(args)
    expected = dict(whole)
    for rest, (shape, layers) in per_layer.items():
        stacked = hfm.CKPT_LAYER + rest
        if stacked in meta:
            expected[stacked] = (args.num_layers, *shape)
        else:
            expected.update({f"{hfm.CKPT_LAYER}{i}.{rest}": shape for i in layers})
    for key, shape in expected.items():
        if key not in meta:
            raise CliError(f"checkpoint {directory} holds another model than model={args.name}: "
                           f"it has no tensor {key}")
        found = tuple(meta[key].global_shape)
        if found != shape:
            raise CliError(f"checkpoint {directory} holds another model than model={args.name}: {key} is "
                           f"{list(found)} there, {list(shape)} for this shape (num_layers={args.num_layers} "
                           f"hidden_size={args.hidden_size} heads={args.num_attention_heads}/"
                           f"{args.num_query_groups} ffn={args.ffn_hidden_size} vocab={args.vocab_size})")
    return meta


def load_model_weights(model: torch.nn.Module, directory: Path, args: ModelArgs) -> None:
    """Load a checkpoint's model tensors (resharded to this model's layout; optimizer state ignored)."""
    from megatron.core import dist_checkpointing

    check_checkpoint_matches(directory, args)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(directory))
    model.load_state_dict(loaded["model"])


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
            raise CliError(f"hf_dir={hf_dir}: no model.safetensors or model.safetensors.index.json "
                           "(only safetensors checkpoints are supported)")
        for file in sorted(set(weight_map.values())):
            if not (hf_dir / file).is_file():
                raise CliError(f"hf_dir={hf_dir}: shard {file} listed in {index.name} is missing")
        self.hf_dir, self.weight_map = hf_dir, weight_map
        self._open: dict[str, Any] = {}
        self._safe_open = safe_open

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CliError(f"hf_dir={self.hf_dir}: tensor {name} is missing from the checkpoint")
        file = self.weight_map[name]
        if file not in self._open:  # keep files open (memory-mapped), read tensors lazily
            self._open[file] = self._safe_open(self.hf_dir / file, "pt")
        return self._open[file].get_tensor(name)


def prepare_import(hf_dir: Path, name: str | None, overrides: Mapping[str, Any]) -> tuple[ModelArgs, dict, SafetensorsReader]:
    """Everything that can be wrong with the input, checked before megatron is imported."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CliError(f"hf_dir={hf_dir}: no config.json")
    hf_config = json.loads(config_path.read_text())
    args = hfm.args_from_hf_config(hf_config, name or hf_dir.name.lower().replace("-", "_").replace(".", "_"))
    fields = {k[len("model."):]: v for k, v in overrides.items()}
    unknown = set(fields) - set(ModelArgs.__dataclass_fields__)
    if unknown:
        raise CliError(f"unknown model field(s) {', '.join(sorted('model.' + f for f in unknown))}")
    args = hfm.with_overrides(args, fields)
    window = hf_config.get("sliding_window")
    if hfm.architecture_of(hf_config) in ("MistralForCausalLM", "MixtralForCausalLM") and window and window < args.max_position_embeddings:
        # Mistral-7B-v0.1 style: full attention equals it on sequences up to the window
        print(f"convert: note: sliding_window={window} is not modeled; ShardForge attends to the full context "
              f"(identical for sequences of up to {window} tokens)", file=sys.stderr)
    reader = SafetensorsReader(hf_dir)
    needed = set(hfm.hf_tensor_names(args, hfm.architecture_of(hf_config)))
    missing = sorted(needed - reader.names())
    if missing:
        raise CliError(f"hf_dir={hf_dir}: tensor {missing[0]} (and {len(missing) - 1} more) missing "
                       f"for a {args.num_layers}-layer {hfm.architecture_of(hf_config)}")
    extra = sorted(n for n in reader.names() - needed
                   if not n.endswith(_IGNORED_HF_TENSORS) and not (n == "lm_head.weight" and args.tie_word_embeddings))
    if extra:
        raise CliError(f"hf_dir={hf_dir}: unexpected tensor {extra[0]} ({len(extra)} in all): not a plain "
                       f"{hfm.architecture_of(hf_config)} of this config")
    return args, hf_config, reader


def write_model_checkpoint(model: torch.nn.Module, args: ModelArgs, out: Path) -> None:
    """A model-only dist checkpoint <out>/iter_0000000 (+ <out>/model.yaml); the caller writes `latest`
    once everything else it adds is complete."""
    from megatron.core import dist_checkpointing

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (CHECKPOINT_ITER + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # model_args: the same common-state entry training checkpoints carry (shape checks read it)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "model_args": hfm.args_to_yaml_dict(args)},
                            str(tmp))
    os.replace(tmp, out / CHECKPOINT_ITER)
    (out / "model.yaml").write_text(yaml.safe_dump(hfm.args_to_yaml_dict(args), sort_keys=False))


def import_hf(hf_dir: Path, out: Path, *, name: str | None = None, dtype: str = "fp32",
              overrides: Mapping[str, Any] | None = None) -> Path:
    if dtype not in DTYPES:
        raise CliError(f"dtype={dtype}: expected one of {', '.join(DTYPES)}")
    if (out / "latest").exists():
        raise CliError(f"out={out} already holds a checkpoint (remove it first)")
    args, hf_config, reader = prepare_import(hf_dir, name, overrides or {})

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
                    raise CliError(f"hf_dir={hf_dir}: {key} maps to shape {list(tensor.shape)}, model expects "
                                   f"{list(param.shape)} (config.json and tensors disagree)")
                param.copy_(tensor)
                filled.add(key)
        unfilled = sorted(set(params) - filled)
        if unfilled:  # a mapping bug, not bad input
            raise RuntimeError(f"import_hf left parameters unset: {unfilled}")
        write_model_checkpoint(model, args, out)
    finally:
        shutdown()
    (out / "hf_config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer_files = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    if {"tokenizer.json", "tokenizer.model"} & set(tokenizer_files):  # a config alone is no tokenizer
        (out / "tokenizer").mkdir(exist_ok=True)
        for f in tokenizer_files:
            shutil.copy2(hf_dir / f, out / "tokenizer" / f)
    (out / "latest").write_text(CHECKPOINT_ITER + "\n")  # last: the checkpoint is complete
    return out / CHECKPOINT_ITER


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
    from launcher.checkpoint import zero_meta

    if zero_meta(_resolve_any(checkpoint)) is not None:  # DeepSpeed ZeRO-3: through a megatron checkpoint
        import tempfile

        from launcher.zero_convert import zero_to_megatron

        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
            zero_to_megatron(checkpoint, Path(tmp) / "megatron")
            return export_hf(str(Path(tmp) / "megatron"), out, tokenizer=tokenizer, model=model,
                             architecture=architecture, dtype=dtype, max_shard_size_mb=max_shard_size_mb)
    directory = resolve_checkpoint(checkpoint)
    args = model_args_for(directory, model)
    root = checkpoint_root(directory)
    base_config = json.loads((root / "hf_config.json").read_text()) if (root / "hf_config.json").is_file() else {}
    if architecture is None:
        archs = base_config.get("architectures") or []
        architecture = archs[0] if archs else hfm.default_architecture(args)
    config = hfm.hf_config_from_args(args, architecture, base_config)  # validates architecture vs shape
    if dtype is not None and dtype not in DTYPES:
        raise CliError(f"dtype={dtype}: expected one of {', '.join(DTYPES)}")
    tokenizer_dir = Path(tokenizer) if tokenizer else (root / "tokenizer" if (root / "tokenizer").is_dir() else None)
    if tokenizer_dir is not None and not tokenizer_dir.exists():
        raise CliError(f"tokenizer={tokenizer}: no such file or directory")
    if out.exists() and any(out.iterdir()):
        raise CliError(f"out={out} exists and is not empty")
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
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        _copy_tokenizer(tokenizer_dir, out)
    if final.exists():
        final.rmdir()  # empty (checked above)
    os.replace(out, final)


def _copy_tokenizer(source: Path, out: Path) -> None:
    """Tokenizer files into an HF dir: a directory's known files, a tokenizer.json, or a bare
    sentencepiece model (ShardForge's default tokenizer), which gets the tokenizer_config.json
    transformers needs to load it as a LlamaTokenizer."""
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
        return
    if source.suffix != ".model":
        shutil.copy2(source, out / source.name)
        return
    import sentencepiece as spm

    shutil.copy2(source, out / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(source))
    specials = {f"{role}_token": sp.id_to_piece(i) for role, i in
                (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())) if i >= 0}
    # ShardForge's data pipeline adds no BOS/EOS when encoding (launcher.data.tokenizer); legacy=True
    # keeps sentencepiece's own handling of the leading space.
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": True,
              **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    commands = ("import_hf", "export_hf", "zero_to_megatron")
    try:
        if not argv or argv[0] not in commands:
            raise CliError(f"usage: python -m launcher.convert {{{' | '.join(commands)}}} key=value ... "
                           f"(see the module docstring)")
        if argv[0] == "import_hf":
            opts = parse_overrides(argv[1:], {"hf_dir": None, "out": None, "name": None, "dtype": "fp32"},
                                   prefixes=("model.",))
            _require(opts, "hf_dir", "out")
            overrides = {k: v for k, v in opts.items() if k.startswith("model.")}
            path = import_hf(Path(opts["hf_dir"]), Path(opts["out"]), name=opts["name"], dtype=opts["dtype"],
                             overrides=overrides)
            name = yaml.safe_load((path.parent / "model.yaml").read_text())["name"]
            print(f"convert: wrote {path} (model shape in {path.parent / 'model.yaml'}; "
                  f"copy it to conf/model/{name}.yaml and train with model={name} checkpoint.load={path.parent})")
        elif argv[0] == "zero_to_megatron":
            from launcher.zero_convert import zero_to_megatron

            opts = parse_overrides(argv[1:], {"checkpoint": None, "out": None})
            _require(opts, "checkpoint", "out")
            path = zero_to_megatron(opts["checkpoint"], Path(opts["out"]))
            print(f"convert: wrote {path} (train it with checkpoint.load={path.parent}, or export_hf it)")
        else:
            opts = parse_overrides(argv[1:], {"checkpoint": None, "out": None, "tokenizer": None, "model": None,
                                              "architecture": None, "dtype": None, "max_shard_size_mb": 2000})
            _require(opts, "checkpoint", "out")
            export_hf(str(opts["checkpoint"]), Path(opts["out"]), tokenizer=opts["tokenizer"], model=opts["model"],
                      architecture=opts["architecture"], dtype=opts["dtype"],
                      max_shard_size_mb=float(opts["max_shard_size_mb"]))
            print(f"convert: wrote {opts['out']}")
    except (CliError, hfm.HFMappingError) as err:
        print(f"convert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # dist_checkpointing's writer may spawn processes: keep this guard
    # main of the importable module, not of __main__: launcher.zero_convert raises that module's
    # CliError, which a __main__.CliError handler would not catch
    from launcher import convert

    sys.exit(convert.main(sys.argv[1:]))
