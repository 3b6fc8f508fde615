"""MoE runtime options end to end through the CLI, each against a single-process reference: the
allgather token dispatcher, router z-loss, per-sequence aux loss, group-limited routing, token
dropping with a capacity factor, Qwen-MoE's gated shared expert, activation recompute and the
interleaved (virtual) pipeline under expert parallelism; the reported dropped-token fraction equals
one counted independently from the routers' inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import FAST, train_runs

STEPS = 4
COMMON = [*FAST, "train.seq_length=64", f"train.steps={STEPS}", "checkpoint.final_save=false"]
MIXTRAL = ["model=mixtral_tiny"]
Z_LOSS = ["model.moe_z_loss_coeff=0.01"]
CAPACITY = ["model.moe_expert_capacity_factor=0.5"]
# name: (model + options both sides share, extra options of the expert-parallel side, its ranks)
CASES = {
    # Recompute runs on the expert-parallel side: matching the plain single process checks it too.
    "allgather_zloss": ([*MIXTRAL, "model.moe_token_dispatcher_type=allgather", *Z_LOSS],
                        ["parallel.ep=2", "train.recompute=full"], 2),
    "seq_aux_group_limited_capacity": ([*MIXTRAL, "model.moe_router_load_balancing_type=seq_aux_loss",
                                        "model.moe_router_num_groups=4", "model.moe_router_group_topk=2", *CAPACITY],
                                       ["parallel.ep=2"], 2),
    "qwen_moe_shared_expert": (["model=qwen_moe_tiny"], ["parallel.ep=2", "train.recompute=selective"], 2),
}


VPP_EP = [*MIXTRAL, "model.moe_expert_capacity_factor=100", "parallel.ep=2", "parallel.pp=2", "parallel.vpp=2"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, cache_env) -> tuple[Path, dict[str, list[dict]]]:
    """Each case's single-process reference ("<case>_single", and plain Mixtral's) and its
    expert-parallel run, and the interleaved-pipeline run on 4 ranks; the capacity probe (3 steps,
    factor 1) at the end of the one-process launch, its stdout in base/capacity_probe.txt (a launch
    fewer: each costs an interpreter and its imports). Returns base and every run's metrics."""
    references = {"mixtral": MIXTRAL, **{name: shared for name, (shared, _, _) in CASES.items()}}
    runs = [(f"{name}_single", [*COMMON, *options], 1) for name, options in references.items()]
    runs += [(name, [*COMMON, *shared, *parallel], n) for name, (shared, parallel, n) in CASES.items()]
    runs.append(("vpp_ep", [*COMMON, *VPP_EP], 4))
    base = tmp_path_factory.mktemp("moe_options")
    probe = ("capacity_probe", ["tests.scripts.moe_capacity_probe", "3", "1.0"], 1)
    return base, train_runs(base, runs, then=[probe])


@pytest.fixture(scope="module")
def trained(launched) -> dict[str, list[dict]]:
    return launched[1]


def _assert_same_training(got: list[dict], ref: list[dict], dropless_ref: bool = False) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in ref] == list(range(1, STEPS + 1))
    assert ref[-1]["loss"] < ref[0]["loss"]
    for r, m in zip(ref, got):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-5), f"step {m['step']}"
        assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), f"step {m['step']}"
        for key in ("moe_aux_loss", "moe_seq_aux_loss", "moe_z_loss", "moe_dropped_fraction"):
            if dropless_ref and key == "moe_dropped_fraction":
                continue
            assert (key in m) == (key in r), key
            if key in m:
                assert m[key] == pytest.approx(r[key], rel=1e-5, abs=1e-9), f"step {m['step']} {key}"
        for key in ("moe_load_min", "moe_load_max", "moe_load_mean"):  # the same routing decisions
            assert m[key] == pytest.approx(r[key], abs=0.5), f"step {m['step']} {key}"


@pytest.mark.parametrize("name", list(CASES))
def test_option_under_expert_parallel_matches_single_process(name, trained):
    ref = trained[f"{name}_single"]
    _assert_same_training(trained[name], ref)
    if name == "allgather_zloss":
        assert all(0 < m["moe_z_loss"] < 100 for m in ref)  # mean logsumexp(router logits)^2
        plain = trained["mixtral_single"]
        assert "moe_z_loss" not in plain[0]
        # The z-loss reaches the model only through gradients (the reported loss is the LM loss).
        assert ref[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)
        assert abs(ref[0]["grad_norm"] - plain[0]["grad_norm"]) > 1e-4 * plain[0]["grad_norm"]
    if name == "seq_aux_group_limited_capacity":
        assert "moe_aux_loss" not in ref[0] and all(0.5 < m["moe_seq_aux_loss"] < 8 for m in ref)
        tokens_per_forward = 2 * 64  # micro batch x seq: every router call drops on its own tokens
        capacity = math.ceil(tokens_per_forward * 2 / 8 * 0.5)  # top-2 of 8 experts, factor 0.5
        micro_batches = 8 // 2
        for m in ref:
            # Each expert keeps at most `capacity` tokens per router call, i.e. at most half of the
            # token-slots asked for: at least half are dropped.
            assert 0.5 <= m["moe_dropped_fraction"] < 1
            assert m["moe_load_max"] <= capacity * micro_batches


def test_vpp_with_expert_parallel_and_large_capacity_matches_dropless_single_process(trained):
    # Interleaved 1F1B (pp=2 x vpp=2, one layer per chunk) with ep=2 on 4 ranks; a capacity factor
    # so large that nothing is dropped trains exactly the dropless model.
    got = trained["vpp_ep"]
    assert [m["moe_dropped_fraction"] for m in got] == [0.0] * STEPS
    _assert_same_training(got, trained["mixtral_single"], dropless_ref=True)


def test_dropped_fraction_equals_an_independent_count(launched):
    # Factor 1: some experts are over capacity, others not (min(count, capacity) matters).
    stdout = (launched[0] / "capacity_probe.txt").read_text()
    steps = [json.loads(line[len("METRICS "):]) for line in stdout.splitlines() if line.startswith("METRICS ")]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert 0.01 < s["independent_dropped_fraction"] < 0.5
        assert s["moe_dropped_fraction"] == pytest.approx(s["independent_dropped_fraction"], abs=1e-12)
