"""Fail before training, not after: launcher/preflight.py finds an unwritable run.dir or
checkpoint.dir, a disk without room for the first checkpoint and a missing tokenizer at start-up,
each as one ConfigError naming the key. The checkpoint size it expects is checked against the
parameter count of the same shape in transformers and against a real checkpoint in tests/dist."""
from __future__ import annotations

import dataclasses
import shutil
from collections import namedtuple

import pytest

from launcher import preflight
from launcher.config.validate import ConfigError, validate
from models.args import ModelArgs
from test_config_errors import compose_config


def _config(tmp_path, *overrides: str):
    return validate(compose_config(f"run.dir={tmp_path / 'run'}", *overrides), 1, "cpu").config


def _args(cfg) -> ModelArgs:
    return ModelArgs.from_config(dataclasses.asdict(cfg.model))


def _error(cfg) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        preflight.check(cfg, _args(cfg), 4)
    return err.value


def test_a_writable_run_passes_and_leaves_no_probe_behind(tmp_path):
    cfg = _config(tmp_path)
    preflight.check(cfg, _args(cfg), 4)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize("key", ["run.dir", "checkpoint.dir"])
def test_an_unwritable_directory_names_its_key(tmp_path, key):
    (tmp_path / "a_file").write_text("")  # a directory cannot be made under a file (root or not)
    cfg = _config(tmp_path, f"{key}={tmp_path / 'a_file' / 'sub'}")
    err = _error(cfg)
    assert err.key == key and f"{tmp_path / 'a_file' / 'sub'} is not writable" in str(err)


def test_an_unwritable_directory_names_its_key_without_root(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        probe = locked / "probe"
        probe.touch()
        probe.unlink()
        pytest.skip("running as root: permissions do not stop writes")
    except PermissionError:
        pass
    err = _error(_config(tmp_path, f"checkpoint.dir={locked}"))
    assert err.key == "checkpoint.dir" and "Permission denied" in str(err)


def test_a_disk_without_room_for_the_first_checkpoint_is_found_up_front(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    needed = preflight.checkpoint_bytes(_args(cfg), 4)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed - 1))
    err = _error(cfg)
    assert err.key == "checkpoint.dir" and "needs about 0.08 GiB" in str(err)
    # nothing is saved: nothing to make room for
    preflight.check(_config(tmp_path, "checkpoint.final_save=false"), _args(cfg), 4)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed))
    preflight.check(cfg, _args(cfg), 4)


def test_checkpoint_size_counts_every_parameter_of_the_shape():
    """Against transformers' parameter count of the same Llama shape (norm weights aside)."""
    import torch
    import transformers

    cfg = compose_config()
    args = ModelArgs.from_config(dict(cfg.model))
    hf = transformers.LlamaConfig(vocab_size=args.padded_vocab_size, hidden_size=args.hidden_size,
                                  intermediate_size=args.ffn_hidden_size, num_hidden_layers=args.num_layers,
                                  num_attention_heads=args.num_attention_heads,
                                  num_key_value_heads=args.num_query_groups, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf)
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert preflight.num_parameters(args) == model.num_parameters() - norms
    assert cfg.model.name == "tiny"


def test_a_missing_tokenizer_is_found_up_front(tmp_path):
    (tmp_path / "d.bin").write_text("")
    (tmp_path / "d.idx").write_text("")
    cfg = _config(tmp_path, "data=indexed", f"data.prefixes=[{tmp_path / 'd'}]",
                  f"data.tokenizer={tmp_path / 'nope.model'}")
    err = _error(cfg)
    assert err.key == "data.tokenizer" and f"no tokenizer at {tmp_path / 'nope.model'}" in str(err)
