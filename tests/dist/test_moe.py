"""Mixture of experts: expert parallelism trains the same model as one process (dropless,
per-step loss through the CLI), a rank that receives no tokens neither crashes nor hangs, and
aux-loss-free expert bias moves load toward balance (bad MoE configs: tests/unit/test_config_errors.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import FAST, read_metrics, train_runs

STEPS = 6
MID = STEPS // 2  # evaluations at MID and STEPS
MOE = ["model=mixtral_tiny"]
LAYOUTS = [
    ("ep2", ["parallel.ep=2"], 2),
    ("ep2_tp2", ["parallel.ep=2", "parallel.tp=2"], 4),  # expert TP = TP, sequence parallel
    ("ep2_pp2", ["parallel.ep=2", "parallel.pp=2"], 4),
    # Context parallelism: each CP rank routes its share of every sequence as tokens of its own.
    ("cp2_ep2", ["parallel.cp=2", "parallel.ep=2"], 2),
]


EVAL = ["data.split=98/2", f"eval.every={MID}", "eval.iters=2"]  # held-out documents, evaluated twice


EXPERT_LAYOUTS = [("ep2", 1, 1, 2, 2), ("ep2_tp2", 2, 1, 2, 4), ("ep2_pp2", 1, 2, 2, 4)]  # name, tp, pp, ep, ranks
SKEW = [0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0]


def _save_init(path, tp, pp, ep) -> list[str]:
    # qwen_moe_tiny: routed experts, router, gated shared expert, qkv bias.
    return ["tests.scripts.save_init", str(path), str(tp), str(pp), "0", "7", "qwen_moe_tiny", str(ep)]


def _probe(steps: int, rate: float, bias: list[float], nproc: int = 2) -> list[str]:
    return ["tests.scripts.moe_router_probe", str(nproc), str(steps), str(rate), *map(str, bias)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, cache_env) -> Path:
    """Everything this module checks, in one launch per world size (2, 4, then 1 rank): the
    single-process MoE reference, every expert-parallel layout and one dense step (base/<name>; the
    MoE runs also evaluate on held-out documents); then each expert layout's initial weights
    (tests/scripts/save_init) and, in the 1-rank launch after the others, their comparison with the
    single process's (base/compare_<name>.txt); the router probes (base/<probe>.txt)."""
    base = tmp_path_factory.mktemp("moe")
    common = [*FAST, f"train.steps={STEPS}", "checkpoint.final_save=false", *EVAL]
    runs = [*[(name, [*common, *MOE, *extra], n) for name, extra, n in LAYOUTS],
            ("single", [*common, *MOE], 1), ("dense", [*FAST, "train.steps=1", "checkpoint.final_save=false"], 1)]
    init = base / "init"
    then = [*[(f"init_{name}", _save_init(init / name, tp, pp, ep), n) for name, tp, pp, ep, n in EXPERT_LAYOUTS],
            # Experts 0 and 1 (EP rank 0) get every token's top-2; EP rank 1's four experts get none.
            ("zero_tokens", _probe(3, 0.0, [100, 100, 0, 0, 0, 0, 0, 0]), 2),
            ("init_single", _save_init(init / "single", 1, 1, 1), 1),
            *[(f"compare_{name}", ["tests.scripts.save_init", "--compare", str(init / "single"), str(init / name)], 1)
              for name, *_ in EXPERT_LAYOUTS],
            ("bias_fixed", _probe(12, 0.0, SKEW, nproc=1), 1), ("bias_updated", _probe(12, 0.05, SKEW, nproc=1), 1)]
    train_runs(base, runs, then=then)
    return base


@pytest.fixture(scope="module")
def trained(launched) -> dict[str, list[dict]]:
    """Each run's train records by name, and its eval records under "<name>/eval"."""
    names = ["single", "dense", *[x[0] for x in LAYOUTS]]
    return {**{name: read_metrics(launched / name) for name in names},
            **{f"{name}/eval": read_metrics(launched / name, type="eval") for name in names}}


@pytest.mark.parametrize("name", [x[0] for x in LAYOUTS])
def test_expert_parallel_matches_single_process(name, trained):
    reference, got = trained["single"], trained[name]
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert reference[-1]["loss"] < reference[0]["loss"]
    for ref, m in zip(reference, got):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"step {m['step']}"
        # The aux loss only reaches the loss through gradients: check them directly.
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), f"step {m['step']}"
        assert m["moe_aux_loss"] == pytest.approx(ref["moe_aux_loss"], rel=1e-5), f"step {m['step']}"
        for key in ("moe_load_min", "moe_load_max", "moe_load_mean"):  # the same routing decisions
            assert m[key] == pytest.approx(ref[key], abs=0.5), f"step {m['step']} {key}"


@pytest.mark.parametrize("name", [x[0] for x in LAYOUTS])
def test_expert_parallel_eval_loss_matches_single_process(name, trained):
    reference, got = trained["single/eval"], trained[f"{name}/eval"]
    assert [e["step"] for e in got] == [e["step"] for e in reference] == [MID, STEPS]
    for ref, e in zip(reference, got):
        assert e["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6), e["step"]
        assert e["eval_tokens"] == ref["eval_tokens"]


def test_moe_metrics_in_metrics_jsonl(trained):
    # (some steps follow an evaluation: its routing adds nothing to the step's load or losses)
    reference = trained["single"]
    tokens_per_step = reference[0]["tokens"]
    for m in reference:
        assert m["moe_load_mean"] == pytest.approx(tokens_per_step * 2 / 8)  # top-2 of 8 experts
        assert m["moe_load_min"] <= m["moe_load_mean"] <= m["moe_load_max"]
        assert m["moe_imbalance"] == pytest.approx(m["moe_load_max"] / m["moe_load_mean"])
        assert m["moe_imbalance_worst_layer"] >= m["moe_imbalance"] >= 1
        assert 0.5 < m["moe_aux_loss"] < 8  # 1 at perfect balance, num_experts at total collapse
        assert "moe_dropped_fraction" not in m  # dropless


def test_dense_model_has_no_moe_metrics(trained):
    assert not [k for k in trained["dense"][0] if k.startswith("moe_")]


@pytest.mark.parametrize("name", [x[0] for x in EXPERT_LAYOUTS])
def test_expert_weights_identical_in_every_layout(launched, name):
    out = (launched / f"compare_{name}.txt").read_text()
    keys = next(line for line in out.splitlines() if line.startswith("keys: ")).split()
    for key in ("mlp.experts.experts.linear_fc1.weight", "mlp.experts.experts.linear_fc2.weight", "mlp.router.weight",
                "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.gate_weight"):
        assert any(k.endswith(key) for k in keys), (key, keys)
    assert out.strip().endswith("differ: []"), out


def _metrics(out: str) -> list[dict]:
    return [json.loads(line[len("METRICS "):]) for line in out.splitlines() if line.startswith("METRICS ")]


def test_rank_receiving_zero_tokens_trains(launched):
    steps = _metrics((launched / "zero_tokens.txt").read_text())
    assert [s["step"] for s in steps] == [1, 2, 3]
    tokens = 8 * 64
    for s in steps:
        assert math.isfinite(s["loss"])
        assert s["moe_load_min"] == 0 and s["moe_load_max"] == tokens
        assert s["moe_imbalance"] == pytest.approx(8 / 2)


def test_expert_bias_moves_load_toward_balance(launched):
    fixed, updated = (_metrics((launched / f"{name}.txt").read_text()) for name in ("bias_fixed", "bias_updated"))
    assert fixed[0]["moe_imbalance"] == pytest.approx(updated[0]["moe_imbalance"])  # same start
    assert updated[0]["moe_imbalance"] > 2  # the preset bias does skew the load
    # The sign update (rate 0.05 per step) overshoots and oscillates: judge the last few steps.
    late = sum(s["moe_imbalance"] for s in updated[-4:]) / 4
    assert late < 0.6 * updated[0]["moe_imbalance"]
    assert late < 0.6 * sum(s["moe_imbalance"] for s in fixed[-4:]) / 4
