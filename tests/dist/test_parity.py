"""Every parallel layout (context parallelism included) trains the same model: per-step loss (and grad norm) equal to the
single-process run, each layout a real torchrun with gloo on CPU, fp32 (the layouts of one world
size share one torchrun)."""
from __future__ import annotations

import pytest

from conftest import FAST, train_runs

STEPS = 10
LAYOUTS = [
    ("tp2", ["parallel.tp=2"], 2),
    ("pp2", ["parallel.pp=2"], 2),
    ("dp2", [], 2),
    ("tp2_pp2", ["parallel.tp=2", "parallel.pp=2"], 4),
    ("pp2_vpp2", ["parallel.pp=2", "parallel.vpp=2"], 2),
    # Activation recompute changes memory, never numbers.
    ("recompute_full", ["train.recompute=full"], 1),
    ("recompute_selective_tp2", ["train.recompute=selective", "parallel.tp=2"], 2),
    ("recompute_mlp_layernorm", ["train.recompute=[mlp,layernorm]"], 1),
    ("recompute_mlp_act_tp2", ["train.recompute=[mlp_act,layernorm]", "parallel.tp=2"], 2),
    # Context parallelism: each row split over the CP ranks, attention by passing K/V blocks around
    # the ring or by gathering them.
    ("cp2_ring", ["parallel.cp=2", "parallel.cp_mode=ring"], 2),
    ("cp2_allgather", ["parallel.cp=2", "parallel.cp_mode=allgather"], 2),
    ("cp4_ring", ["parallel.cp=4", "parallel.cp_mode=ring"], 4),
    ("cp4_allgather", ["parallel.cp=4", "parallel.cp_mode=allgather"], 4),
    ("cp2_tp2", ["parallel.cp=2", "parallel.tp=2"], 4),
    ("cp2_pp2", ["parallel.cp=2", "parallel.pp=2"], 4),
    # torch.compile'd layers, under TP and PP as well.
    ("compile_tp2_pp2", ["train.compile=true", "parallel.tp=2", "parallel.pp=2"], 4),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_env) -> dict[str, list[dict]]:
    """The single-process reference and every layout."""
    common = [*FAST, f"train.steps={STEPS}", "checkpoint.final_save=false"]
    runs = [("single", [], 1), *LAYOUTS]
    return train_runs(tmp_path_factory.mktemp("parity"), [(name, [*common, *extra], n) for name, extra, n in runs])


@pytest.mark.parametrize("name", [x[0] for x in LAYOUTS])
def test_layout_matches_single_process(name, trained):
    reference, got = trained["single"], trained[name]
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert reference[-1]["loss"] < reference[0]["loss"]  # it trains at all
    for ref, m in zip(reference, got):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"step {m['step']}"
        # Adam's first steps barely depend on gradient scale, so loss parity alone would miss
        # wrongly scaled gradients: the clipped global grad norm must agree as well.
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), f"step {m['step']}"
        assert m["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert m["tokens"] == ref["tokens"]
