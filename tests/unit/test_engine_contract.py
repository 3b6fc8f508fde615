"""The engine contract and checkpoint directories, in-process (no engine built, no process group).

Both engines must implement every method of `parallel.engine.Engine` with its signature; the
launcher only uses that protocol. launcher/checkpoint.py publishes a directory only once its
writer finished: a writer that fails midway leaves the previous checkpoint and `latest` alone.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from launcher import checkpoint
from parallel.deepspeed_engine import DeepSpeedEngine
from parallel.engine import Engine
from parallel.megatron_engine import MegatronEngine

CONTRACT = [name for name, member in vars(Engine).items() if inspect.isfunction(member) and not name.startswith("_")]


def test_contract_names_the_launcher_s_needs():
    assert set(CONTRACT) == {"train_step", "eval_step", "sequence_logps", "num_parameters", "save", "load",
                             "export_weights"}
    assert set(Engine.__annotations__) == {"args", "device"}


@pytest.mark.parametrize("engine", [MegatronEngine, DeepSpeedEngine])
@pytest.mark.parametrize("method", CONTRACT)
def test_engine_implements_the_contract(engine, method):
    ours, theirs = inspect.signature(getattr(engine, method)), inspect.signature(getattr(Engine, method))
    assert list(ours.parameters) == list(theirs.parameters), f"{engine.__name__}.{method}{ours} vs {theirs}"
    assert ours.return_annotation == theirs.return_annotation, f"{engine.__name__}.{method}{ours} vs {theirs}"
    # the attributes the protocol names are set by the constructor
    init = inspect.getsource(engine.__init__)
    assert all(f"self.{attr}" in init for attr in Engine.__annotations__)


def test_no_engine_specific_dispatch_in_the_launcher():
    launcher = Path(checkpoint.__file__).parent
    for path in launcher.rglob("*.py"):
        text = path.read_text()
        for needle in ("hasattr(engine", "_init_optimizer_states_with_dummy_values", "save_state", "load_state("):
            assert needle not in text, f"{path}: {needle}"


class _FakeEngine:
    """Writes one file per save (named like a dist checkpoint's, which `resolve` looks for); `fail`
    raises midway, like a killed writer."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save(self, directory: Path, step: int) -> None:
        (directory / "metadata.json").write_text(str(step))
        if self.fail:
            raise RuntimeError("killed")

    def load(self, directory: Path) -> int:
        return int((directory / "metadata.json").read_text())


def test_save_publishes_atomically_and_prunes(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        path = checkpoint.save(_FakeEngine(), root, step, keep_last=2)
        assert path == root / checkpoint.iter_dir_name(step) and (path / "metadata.json").read_text() == str(step)
        assert (root / checkpoint.LATEST).read_text() == f"{path.name}\n"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]
    assert checkpoint.load(_FakeEngine(), root) == 3
    assert checkpoint.load(_FakeEngine(), root / "iter_0000002") == 2

    with pytest.raises(RuntimeError, match="killed"):
        checkpoint.save(_FakeEngine(fail=True), root, 4, keep_last=2)
    assert (root / checkpoint.LATEST).read_text() == "iter_0000003\n"  # the failed save is not published
    assert not (root / "iter_0000004").exists() and checkpoint.load(_FakeEngine(), root) == 3

    # a failed save's leftovers are replaced by the next one; re-saving a step replaces it whole
    assert checkpoint.save(_FakeEngine(), root, 4, keep_last=2) == root / "iter_0000004"
    assert not (root / "iter_0000004.tmp").exists()
    checkpoint.save(_FakeEngine(), root, 4)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", "iter_0000004", "latest"]


def test_files_added_to_the_root_precede_latest(tmp_path):
    root = tmp_path / "import"
    with checkpoint.writing(root, 0) as directory:
        (directory / "weights").write_text("w")
        (root / "model.yaml").write_text("name: x\n")
        assert not (root / checkpoint.LATEST).exists()
    assert (root / checkpoint.LATEST).read_text() == "iter_0000000\n"
    assert checkpoint.root_of(root / "iter_0000000") == root and checkpoint.root_of(root) == root


def test_resolve_names_the_key_of_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a 'latest' file"):
        checkpoint.resolve(tmp_path)
