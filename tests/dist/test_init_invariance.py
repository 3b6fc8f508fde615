"""Same seed ⇒ identical initial full weights in every layout (compared tensor by tensor
after gathering each layout's shards through a dist checkpoint)."""
from __future__ import annotations

import re

import pytest

from conftest import run_many


LAYOUTS = [("tp2", 2, 1, 0, 2), ("pp2_vpp2", 1, 2, 2, 2), ("tp2_pp2", 2, 2, 0, 4)]  # name, tp, pp, vpp, ranks


def _save(path, tp, pp, vpp, seed=7) -> list[str]:
    return ["tests.scripts.save_init", str(path), str(tp), str(pp), str(vpp), str(seed)]


def _differing(out: str) -> list[str]:
    match = re.search(r"compared (\d+) tensors, (\d+) values; differ: \[(.*)\]", out)
    assert match and int(match.group(1)) >= 9 and int(match.group(2)) > 1_000_000, out
    return [k for k in match.group(3).replace("'", "").split(", ") if k]


@pytest.fixture(scope="module")
def differing(tmp_path_factory) -> dict[str, list[str]]:
    """The tensors in which each layout's initial weights (and those of another seed) differ from
    the single process's: one launch per world size, the single-process one saving and comparing."""
    base = tmp_path_factory.mktemp("init")
    for nproc in (2, 4):
        run_many([_save(base / name, tp, pp, vpp) for name, tp, pp, vpp, n in LAYOUTS if n == nproc], nproc=nproc)
    others = [*(x[0] for x in LAYOUTS), "seed8"]
    compares = [["tests.scripts.save_init", "--compare", str(base / "single"), str(base / name)] for name in others]
    outputs = run_many([_save(base / "single", 1, 1, 0), _save(base / "seed8", 1, 1, 0, seed=8), *compares])
    return dict(zip(others, map(_differing, outputs[2:])))


@pytest.mark.parametrize("name", [x[0] for x in LAYOUTS])
def test_layout_gets_identical_initial_weights(differing, name):
    assert differing[name] == []


def test_another_seed_gives_other_weights(differing):
    differ = differing["seed8"]
    assert "embedding.word_embeddings.weight" in differ and "output_layer.weight" in differ
    assert "decoder.final_layernorm.weight" not in differ  # norms start at ones in every seed
