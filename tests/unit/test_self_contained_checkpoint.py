"""Checkpoints carry what it takes to use them: the model shape and the tokenizer inside every
iter_* directory (written and published with the checkpoint), found by generate/export, and a
model yaml or checkpoint anywhere trains as `model=<path>`; export_hf writes a tokenizer transformers
loads as it is. The commands themselves: tests/e2e/test_hf_convert.py."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import REPO
from launcher import checkpoint
from launcher.checkpoint_files import MODEL_YAML, TOKENIZER_DIR, checkpoint_files, find, iter_directory, tokenizer_files
from launcher.config.validate import ConfigError
from launcher.data.tokenizer import load_tokenizer
from launcher.model_io import model_args_for
from launcher.model_path import ORIGINAL, resolve_model_argv
from models.args import ModelArgs
from tests.tiny_tokenizers import HF_TEMPLATE, train_hf, train_sp

SHAPE = dict(name="mine", num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             num_query_groups=2, vocab_size=777, max_position_embeddings=128)
TEXT = "Return the number of items: 12345 <|im_start|>"


class _Engine:
    """The engine contract's save, writing one file (or failing)."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save(self, directory: Path, step: int) -> None:
        (directory / "state.pt").write_text(str(step))
        if self.fail:
            raise OSError("disk full")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {"sentencepiece": load_tokenizer(train_sp(d)), "hf": load_tokenizer(train_hf(d / "hf", HF_TEMPLATE))}


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_checkpoint_holds_the_shape_and_a_tokenizer_that_rebuilds(tmp_path, tokenizers, kind):
    tok = tokenizers[kind]
    files = checkpoint_files({**SHAPE, "moe_layer_freq": (1, 0, 1)}, tok)
    path = checkpoint.save(_Engine(), tmp_path / "ckpt", 5, files=files)
    assert path == tmp_path / "ckpt" / "iter_0000005" and (tmp_path / "ckpt" / "latest").read_text().strip() == path.name
    assert ModelArgs.from_config(yaml.safe_load((path / MODEL_YAML).read_text())) == \
        ModelArgs.from_config({**SHAPE, "moe_layer_freq": [1, 0, 1]})
    again = load_tokenizer(path / TOKENIZER_DIR)
    assert type(again) is type(tok) and again.encode(TEXT) == tok.encode(TEXT)
    assert (again.bos_id, again.eos_id, again.pad_id, again.chat_template) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_template)
    assert find(iter_directory(tmp_path / "ckpt"), TOKENIZER_DIR) == path / TOKENIZER_DIR
    # a conversion carries them on
    assert sorted(tokenizer_files(path)) == sorted(k for k in files if k.startswith(TOKENIZER_DIR))


def test_a_failed_save_publishes_neither_checkpoint_nor_files(tmp_path, tokenizers):
    root = tmp_path / "ckpt"
    files = checkpoint_files(SHAPE, tokenizers["sentencepiece"])
    checkpoint.save(_Engine(), root, 1, files=files)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(_Engine(fail=True), root, 2, files=files)
    assert (root / "latest").read_text().strip() == "iter_0000001"
    assert not (root / "iter_0000002").exists() and not (root / "iter_0000002.tmp" / MODEL_YAML).exists()


def _compose(argv: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=argv)


def test_train_model_path_yaml_or_checkpoint(tmp_path):
    """`model=<yaml>` and `model=<checkpoint dir>` compose that shape without files in conf/."""
    yaml_path = tmp_path / "elsewhere" / "shape.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text(yaml.safe_dump(SHAPE))
    argv = resolve_model_argv([f"model={yaml_path}", "train.steps=3"])
    assert argv[0] == "model=mine" and ORIGINAL[argv[0]] == f"model={yaml_path}"
    cfg = _compose(argv)
    assert ModelArgs.from_config(cfg.model) == ModelArgs.from_config(SHAPE) and cfg.train.steps == 3

    # a checkpoint root: its latest iter_* directory's model.yaml, named like a conf option ("tiny")
    tiny = {**yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text()), "num_layers": 1}
    checkpoint.save(_Engine(), tmp_path / "ckpt", 7, files=checkpoint_files(tiny, None))
    argv = resolve_model_argv([f"model={tmp_path / 'ckpt'}"])
    assert argv[0] == "model=tiny_file"  # not conf/model/tiny.yaml, which comes first on the search path
    assert _compose(argv).model.num_layers == 1
    assert resolve_model_argv(["model=tiny", "model.num_layers=2"]) == ["model=tiny", "model.num_layers=2"]
    # the same lookup serves generate/convert's model=, and their default is the checkpoint's own
    assert model_args_for(tmp_path / "ckpt" / "iter_0000007", str(yaml_path)) == ModelArgs.from_config(SHAPE)
    assert model_args_for(tmp_path / "ckpt" / "iter_0000007", None).num_layers == 1


@pytest.mark.parametrize("value", ["missing/shape.yaml", "{dir}"])
def test_model_path_without_a_model_is_one_error(tmp_path, value):
    with pytest.raises(ConfigError) as err:
        resolve_model_argv([f"model={value.format(dir=tmp_path)}"])
    assert err.value.key == "model"


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_exported_tokenizer_loads_in_transformers(tmp_path, tokenizers, kind):
    """export_hf's tokenizer files: AutoTokenizer encodes as ShardForge does and knows bos/eos/pad."""
    transformers = pytest.importorskip("transformers")
    from launcher.convert import _write_generation_config, _write_tokenizer

    tok = tokenizers[kind]
    path = checkpoint.save(_Engine(), tmp_path / "ckpt", 1, files=checkpoint_files(SHAPE, tok))
    if kind == "hf":  # a tokenizer_config.json that names no special tokens
        config_file = path / TOKENIZER_DIR / "tokenizer_config.json"
        config_file.write_text(json.dumps({"chat_template": HF_TEMPLATE}))
    out = tmp_path / "hf"
    out.mkdir()
    _write_tokenizer(path / TOKENIZER_DIR, load_tokenizer(path / TOKENIZER_DIR), out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs(TEXT)["input_ids"] == tok.encode(TEXT)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert theirs.chat_template == tok.chat_template
    _write_generation_config(out, {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id},
                             None)
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.eos_token_id, generation.pad_token_id) == (tok.eos_id, tok.pad_id)


def test_train_command_line_takes_a_model_path(tmp_path, capsys):
    """The train entry point itself (launcher.cli.hydra_command) resolves `model=<yaml>`."""
    from launcher.train import main

    yaml_path = tmp_path / "shape.yaml"
    yaml_path.write_text(yaml.safe_dump(SHAPE))
    main([f"model={yaml_path}", "--cfg", "job"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert ModelArgs.from_config(shown["model"]) == ModelArgs.from_config(SHAPE)
