"""A checkpoint's model in one process, outside training: its shape, a bare GPTModel to hold it,
its weights read and written. Shared by `launcher.convert`, `launcher.zero_convert` and
`launcher.generate` (and the tests that load checkpoints into tensor-parallel models).

Bad input raises ConfigError naming the CLI key it came from (`key`), which the CLIs print as
one line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import yaml

from launcher.config.validate import ConfigError
from launcher.package_data import model_yaml
from models import hf_mapping as hfm
from models.args import ModelArgs

if TYPE_CHECKING:
    from launcher.checkpoint import FileSource
    from models.lora import LoraOptions


def init_world_of_one(seed: int = 0) -> None:
    """gloo process group + megatron parallel state with a single rank, on CPU."""
    from parallel.layout import Layout
    from parallel.megatron_engine import init_distributed

    init_distributed(Layout(world_size=1), torch.device("cpu"), seed)


def build_model(args: ModelArgs, *, tp: int = 1, ep: int = 1, params_dtype: torch.dtype = torch.float32,
                lora: LoraOptions | None = None):
    """One whole-model GPTModel chunk (pp=1) on CPU, with `lora`'s adapters if given; parallel state
    must be initialized."""
    from models.kernel_provider import KernelOptions
    from models.llama import build_llama, transformer_config

    config = transformer_config(args, tp=tp, pp=1, vpp=None, params_dtype=params_dtype, on_cpu=True, recompute=None,
                                ep=ep)
    return build_llama(args, config, KernelOptions(lora=lora), pre_process=True,
                       post_process=True)  # (CPU, torch backend)


def resolve_any(path: str | os.PathLike, key: str) -> Path:
    """A checkpoint root or iter_* directory of any engine -> the iter_* directory."""
    from launcher.checkpoint import resolve

    try:
        return resolve(path)
    except FileNotFoundError as err:
        raise ConfigError(key, str(err)) from err


def resolve_checkpoint(path: str | os.PathLike, key: str = "checkpoint") -> Path:
    """A checkpoint root or iter_* directory -> the iter_* directory, which must be a dist checkpoint."""
    directory = resolve_any(path, key)
    if not (directory / "metadata.json").is_file():
        raise ConfigError(key, f"{directory} is not a complete dist checkpoint (no metadata.json)")
    return directory


def model_yaml_path(model: str, key: str = "model") -> Path:
    """`model=` as a file: a conf/model name, a yaml path, or a checkpoint (root or iter_* directory,
    whose model.yaml is used)."""
    from launcher.checkpoint_files import MODEL_YAML, find, iter_directory

    path = Path(model)
    if path.is_dir():
        found = find(iter_directory(path), MODEL_YAML)
        if found is None:
            raise ConfigError(key, f"{path} is a directory without a checkpoint's {MODEL_YAML}")
        return found
    if not model.endswith((".yaml", ".yml")) and os.sep not in model:
        path = model_yaml(model)
    if not path.is_file():
        raise ConfigError(key, f"no such model config: {path}")
    return path


def _read_model_yaml(path: Path, section: str | None = None) -> ModelArgs:
    cfg = yaml.safe_load(path.read_text())
    cfg = cfg[section] if section else cfg
    try:
        return ModelArgs.from_config(cfg)
    except TypeError as err:
        raise ConfigError("model", f"{path} is not a model config ({err})") from err


def model_args_for(directory: Path, model: str | None) -> ModelArgs:
    """Model shape of a checkpoint: `model` (conf/model name, yaml path or checkpoint), else the
    checkpoint's model.yaml, else the `model_args` it records, else the training run's Hydra config
    next to it."""
    from launcher.checkpoint import root_of
    from launcher.checkpoint_files import MODEL_YAML, find

    if model:
        return _read_model_yaml(model_yaml_path(model))
    if (path := find(directory, MODEL_YAML)) is not None:
        return _read_model_yaml(path)
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(str(directory)).get("model_args")
    if saved is not None:  # training checkpoints (and imports) record their shape
        return ModelArgs.from_config(saved)
    run_config = root_of(directory).parent / ".hydra" / "config.yaml"
    if run_config.is_file():
        return _read_model_yaml(run_config, "model")
    raise ConfigError("model", f"cannot tell the shape of checkpoint {directory} (no {MODEL_YAML} and no "
                               f"training run config); pass model=<conf/model name, yaml path or checkpoint>")


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


def check_checkpoint_matches(directory: Path, args: ModelArgs, key: str = "checkpoint") -> dict[str, Any]:
    """Raise ConfigError(key) unless the checkpoint holds exactly the model tensors of `args`; returns
    the checkpoint's tensor metadata (key -> ShardedTensor without data)."""
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
    for name, shape in expected.items():
        if name not in meta:
            raise ConfigError(key, f"{directory} holds another model than model={args.name}: it has no tensor {name}")
        found = tuple(meta[name].global_shape)
        if found != shape:
            raise ConfigError(key, f"{directory} holds another model than model={args.name}: {name} is "
                                   f"{list(found)} there, {list(shape)} for this shape (num_layers={args.num_layers} "
                                   f"hidden_size={args.hidden_size} heads={args.num_attention_heads}/"
                                   f"{args.num_query_groups} ffn={args.ffn_hidden_size} vocab={args.vocab_size})")
    return meta


def load_model_weights(model: torch.nn.Module, directory: Path, args: ModelArgs, key: str = "checkpoint") -> None:
    """Load a checkpoint's model tensors (resharded to this model's layout; optimizer state ignored)."""
    from parallel.megatron_state import load_model

    check_checkpoint_matches(directory, args, key)
    load_model(model, directory)


def write_model_checkpoint(model: torch.nn.Module, args: ModelArgs, out: Path,
                           files: Mapping[str, FileSource] | None = None) -> Path:
    """A model-only checkpoint <out>/iter_0000000 with `files` and the shape (model.yaml: train it
    with `model=<out>`), published through launcher.checkpoint; returns the iter_* directory."""
    from launcher import checkpoint
    from launcher.checkpoint_files import MODEL_YAML
    from launcher.checkpoint_files import model_yaml as shape_yaml
    from parallel.megatron_state import save_model

    shape = hfm.args_to_yaml_dict(args)
    with checkpoint.writing(out, step=0, files={MODEL_YAML: shape_yaml(shape), **(files or {})}) as directory:
        save_model(model, shape, directory)
    return out / checkpoint.iter_dir_name(0)


def check_new_root(out: Path, key: str = "out") -> None:
    """`out` must not hold a checkpoint yet (a conversion never overwrites one)."""
    from launcher.checkpoint import LATEST

    if (out / LATEST).exists():
        raise ConfigError(key, f"{out} already holds a checkpoint (remove it first)")
