"""Same seed ⇒ identical initial full weights in every layout (compared tensor by tensor
after gathering each layout's shards through a dist checkpoint)."""
from __future__ import annotations

import re

import pytest

from conftest import run_cli


def _save(path, tp, pp, vpp, nproc, seed=7):
    run_cli("tests.scripts.save_init", [str(path), str(tp), str(pp), str(vpp), str(seed)], nproc=nproc)
    return path


def _differing(ref, other) -> list[str]:
    out = run_cli("tests.scripts.save_init", ["--compare", str(ref), str(other)]).stdout
    match = re.search(r"compared (\d+) tensors, (\d+) values; differ: \[(.*)\]", out)
    assert match and int(match.group(1)) >= 9 and int(match.group(2)) > 1_000_000, out
    return [k for k in match.group(3).replace("'", "").split(", ") if k]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("init") / "single", 1, 1, 0, 1)


@pytest.mark.parametrize("tp,pp,vpp,nproc", [(2, 1, 0, 2), (1, 2, 2, 2), (2, 2, 0, 4)],
                         ids=["tp2", "pp2_vpp2", "tp2_pp2"])
def test_layout_gets_identical_initial_weights(single, tmp_path, tp, pp, vpp, nproc):
    assert _differing(single, _save(tmp_path / "layout", tp, pp, vpp, nproc)) == []


def test_another_seed_gives_other_weights(single, tmp_path):
    differ = _differing(single, _save(tmp_path / "seed8", 1, 1, 0, 1, seed=8))
    assert "embedding.word_embeddings.weight" in differ and "output_layer.weight" in differ
    assert "decoder.final_layernorm.weight" not in differ  # norms start at ones in every seed
