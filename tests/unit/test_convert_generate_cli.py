"""The convert/generate command lines, in-process: what Hydra composes from the README's commands,
unknown keys refused, free text kept as typed (the CLIs end to end: tests/e2e/test_convert_generate_errors.py,
tests/e2e/test_hf_convert.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from launcher import convert, generate
from launcher.config.validate import ConfigError

CONF = Path(convert.__file__).resolve().parents[1] / "conf" / "tools"


def _compose(app: str, argv: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(app, overrides=argv, return_hydra_config=False)


def test_convert_commands_compose_their_own_schema():
    cfg = _compose("convert", convert.command_argv(["import_hf", "hf_dir=/hf", "out=ck", "model.rotary_base=1e6",
                                                    "model.num_layers=4"]))
    assert (cfg.hf_dir, cfg.out, cfg.dtype, cfg.model.num_layers, cfg.model.rotary_base) == ("/hf", "ck", "fp32", 4, 1e6)
    cfg = _compose("convert", convert.command_argv(["export_hf", "checkpoint=/c", "out=/o", "model=tiny",
                                                    "max_shard_size_mb=0.1"]))
    assert (cfg.checkpoint, cfg.model, cfg.max_shard_size_mb, cfg.tokenizer) == ("/c", "tiny", 0.1, None)
    cfg = _compose("convert", convert.command_argv(["zero_to_megatron", "checkpoint=/z", "out=/o"]))
    assert set(cfg) == {"checkpoint", "out"}


@pytest.mark.parametrize("argv", [["import_hf", "checkpoint=/c"], ["export_hf", "hf_dir=/h"],
                                  ["import_hf", "model.not_a_field=1"], ["zero_to_megatron", "tokenizer=t"]])
def test_a_key_of_another_command_is_an_error(argv):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose("convert", convert.command_argv(argv))


def test_generate_takes_free_text_as_typed():
    prompt = "Hello, world: it's [1,2] ${oc.env:HOME} back\\slash\\"
    cfg = _compose("generate", generate.quote_text(["checkpoint.load=/c", f"prompt={prompt}", "prompt_ids=1,2,3",
                                                    "top_k=5", "kv_cache=false"]))
    assert (cfg.checkpoint.load, cfg.prompt, cfg.prompt_ids, cfg.top_k, cfg.kv_cache) == \
           ("/c", prompt, "1,2,3", 5, False)
    with pytest.raises(ConfigCompositionException):
        _compose("generate", generate.quote_text(["checkpoint.load=/c", "promt=typo"]))


def test_no_command_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as stop:
        convert.command_argv(["exprot_hf", "checkpoint=/c"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "convert: error: command: the first argument must be one of import_hf, export_hf, zero_to_megatron, merge_lora, "
        "got 'exprot_hf' (python -m launcher.convert --help)"]


@pytest.mark.parametrize("argv,key", [(["import_hf", "out=/o"], "hf_dir"), (["export_hf", "checkpoint=/c"], "out"),
                                      (["zero_to_megatron", "out=/o"], "checkpoint")])
def test_a_missing_required_key_is_named(argv, key):
    cfg = _compose("convert", convert.command_argv(argv))
    with pytest.raises(ConfigError) as err:
        convert.COMMANDS[argv[0]][1](cfg)
    assert (err.value.key, err.value.reason) == (key, "required")
