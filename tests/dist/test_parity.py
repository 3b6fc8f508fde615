"""Every parallel layout (context parallelism included, over packed rows as well) trains the same model: per-step
loss (and grad norm) equal to the single-process run, each layout a real torchrun with gloo on CPU, fp32 (the layouts of one world
size share one torchrun). The runs hold out 2% of the documents (data.split) and evaluate on them
every MID steps: the eval loss matches the single process's in every layout, equals a plain
forward of the same weights, and `launcher.evaluate` of a checkpoint reproduces the run's own.
The same launches save each layout's freshly initialized weights (tests/scripts/save_init): same seed,
identical full tensors in every layout."""
from __future__ import annotations

import json

import pytest

from conftest import FAST, NARROW, read_metrics, train_runs
from tests.scripts.save_init import differing

STEPS = 6
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
    # Saved activations in host memory (the layer inputs, under full recompute), through the pipeline.
    ("offload_recompute_full_pp2", ["train.offload_activations=true", "train.recompute=full", "parallel.pp=2"], 2),
    # Context parallelism: each row split over the CP ranks, attention by passing K/V blocks around
    # the ring or by gathering them.
    ("cp2_ring", ["parallel.cp=2", "parallel.cp_mode=ring"], 2),
    ("cp2_allgather", ["parallel.cp=2", "parallel.cp_mode=allgather"], 2),
    ("cp4_ring", ["parallel.cp=4", "parallel.cp_mode=ring"], 4),
    ("cp4_allgather", ["parallel.cp=4", "parallel.cp_mode=allgather"], 4),
    ("cp2_tp2", ["parallel.cp=2", "parallel.tp=2"], 4),
    ("cp2_pp2", ["parallel.cp=2", "parallel.pp=2"], 4),
    ("cp2_pp2_vpp2", ["parallel.cp=2", "parallel.pp=2", "parallel.vpp=2"], 4),
    # torch.compile'd layers, under TP and PP as well.
    ("compile_tp2_pp2", ["train.compile=true", "parallel.tp=2", "parallel.pp=2"], 4),
    # fp32 masters and Adam moments stepped on the host (megatron-core's HybridDeviceOptimizer).
    ("optimizer_offload", ["optim.cpu_offload=true"], 1),
    ("optimizer_offload_dp2", ["optim.cpu_offload=true"], 2),
]
# Resumed from the middle step (MID) with the optimizer offloaded: from its own checkpoint, and from `single`'s.
RESUMED = [("optimizer_offload_resumed", "optimizer_offload"), ("optimizer_offload_from_single", "single")]
# Packed rows: documents end at each EOD (no attention across them, positions restart), against
# the single process on the same rows. Under CP each document is padded to a multiple of 2·cp and
# split per document (the rows' documents include lengths that are not).
PACKED = ["data.reset_attention_mask=true", "data.reset_position_ids=true"]
PACKED_LAYOUTS = [
    ("cp4_ring_packed", ["parallel.cp=4", "parallel.cp_mode=ring"], 4),
    ("cp4_allgather_packed", ["parallel.cp=4", "parallel.cp_mode=allgather"], 4),
]


# Initial weights saved in these layouts (and by the single process, and with another seed).
INIT_LAYOUTS = [("tp2", 2, 1, 0, 2), ("pp2_vpp2", 1, 2, 2, 2), ("tp2_pp2", 2, 2, 0, 4)]  # name, tp, pp, vpp, ranks

MID = STEPS // 2  # evaluations at MID and STEPS; checkpoints at MID
EVAL = ["data.split=98/2", f"eval.every={MID}", "eval.iters=2"]
COMMON = [*FAST, *NARROW, f"train.steps={STEPS}", "checkpoint.final_save=false", *EVAL]
SAVED = [f"checkpoint.save_every={MID}"]  # the last step is not saved: final_save=false
MID_CKPT = f"iter_{MID:07d}"


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_env):
    """The single-process reference and every layout; then, in the same launches, the step-MID
    checkpoints of `single` and `pp2` evaluated (launcher.evaluate) in their own layout and the
    other one, the independent reference loss of `single`'s, and the initial weights of INIT_LAYOUTS
    saved under base/init."""
    base = tmp_path_factory.mktemp("parity")
    runs = [("single", SAVED, 1), ("single_packed", PACKED, 1),
            *[(name, [*extra, *SAVED] if name in ("pp2", "optimizer_offload") else extra, n)
              for name, extra, n in LAYOUTS],
            *[(name, [*PACKED, *extra], n) for name, extra, n in PACKED_LAYOUTS],
            *[(name, ["optim.cpu_offload=true", f"checkpoint.load={base / run / 'checkpoints' / MID_CKPT}"], 1)
              for name, run in RESUMED]]

    def evaluate(name, run, layout):
        return ["launcher.evaluate", *COMMON, *layout, f"checkpoint.load={base / run / 'checkpoints' / MID_CKPT}",
                f"evaluate.output={base / name}.json"]
    train_runs(base, [(name, [*COMMON, *extra], n) for name, extra, n in runs], then=[
        ("evaluate_single", evaluate("evaluate_single", "single", []), 1),
        ("reference_single", ["tests.scripts.eval_reference", str(base / "single" / "checkpoints" / MID_CKPT),
                              f"{base / 'reference_single'}.json", *COMMON], 1),
        ("evaluate_pp2_as_pp2", evaluate("evaluate_pp2_as_pp2", "pp2", ["parallel.pp=2"]), 2),
        ("evaluate_single_as_tp2", evaluate("evaluate_single_as_tp2", "single", ["parallel.tp=2"]), 2),
        *[(f"init_{name}", _save_init(base / "init" / name, tp, pp, vpp), n) for name, tp, pp, vpp, n in
          [("single", 1, 1, 0, 1), *INIT_LAYOUTS]],
        ("init_seed8", _save_init(base / "init" / "seed8", 1, 1, 0, seed=8), 1)])
    return base


def _save_init(path, tp, pp, vpp, seed=7) -> list[str]:
    return ["tests.scripts.save_init", str(path), str(tp), str(pp), str(vpp), str(seed)]


@pytest.fixture(scope="module")
def trained(base) -> dict[str, list[dict]]:
    return {name: read_metrics(base / name)
            for name in ["single", "single_packed", *[x[0] for x in LAYOUTS], *[x[0] for x in PACKED_LAYOUTS]]}


@pytest.mark.parametrize("name", [x[0] for x in RESUMED])
def test_offloaded_optimizer_resumes_on_the_curve(name, trained, base):
    """The host-side masters and moments go through dist_checkpointing: a resume continues the
    single process's curve, bit for bit from an offloaded run's checkpoint."""
    reference, got = trained["single"][MID:], read_metrics(base / name)
    assert [m["step"] for m in got] == list(range(MID + 1, STEPS + 1))
    for ref, m in zip(reference, got):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"step {m['step']}"
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), f"step {m['step']}"
    if name == "optimizer_offload_resumed":
        own = trained["optimizer_offload"][MID:]
        assert [(m["loss"], m["grad_norm"]) for m in got] == [(m["loss"], m["grad_norm"]) for m in own]


def _evals(base, name) -> list[dict]:
    return read_metrics(base / name, type="eval")


@pytest.mark.parametrize("name", [x[0] for x in LAYOUTS])
def test_layout_matches_single_process(name, trained):
    _assert_parity(trained["single"], trained[name])


@pytest.mark.parametrize("name", [x[0] for x in PACKED_LAYOUTS])
def test_packed_layout_matches_single_process(name, trained, base):
    _assert_parity(trained["single_packed"], trained[name])
    reference, got = _evals(base, "single_packed"), _evals(base, name)
    assert [e["step"] for e in got] == [e["step"] for e in reference] == [MID, STEPS]
    for ref, e in zip(reference, got):
        assert e["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6), e["step"]
        assert e["eval_tokens"] == ref["eval_tokens"]


def _assert_parity(reference: list[dict], got: list[dict]) -> None:
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert reference[-1]["loss"] < reference[0]["loss"]  # it trains at all
    for ref, m in zip(reference, got):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"step {m['step']}"
        # Adam's first steps barely depend on gradient scale, so loss parity alone would miss
        # wrongly scaled gradients: the clipped global grad norm must agree as well.
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), f"step {m['step']}"
        assert m["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert m["tokens"] == ref["tokens"]


@pytest.mark.parametrize("name", [x[0] for x in LAYOUTS])
def test_eval_loss_matches_single_process(name, base):
    reference, got = _evals(base, "single"), _evals(base, name)
    assert [e["step"] for e in got] == [e["step"] for e in reference] == [MID, STEPS]
    for ref, e in zip(reference, got):
        assert e["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6), e["step"]
        assert e["eval_tokens"] == ref["eval_tokens"] == 2 * 8 * 128
    assert reference[-1]["eval_loss"] < reference[0]["eval_loss"]  # it learns what it never trained on
    # each evaluation follows its step's train record in metrics.jsonl
    kinds = [(r.get("type", "train"), r["step"]) for r in read_metrics(base / name, type="all")]
    assert kinds.index(("eval", MID)) == kinds.index(("train", MID)) + 1 and kinds[-1] == ("eval", STEPS)


def test_eval_loss_is_a_plain_forward_of_the_same_weights(base):
    ours = next(e for e in _evals(base, "single") if e["step"] == MID)
    reference = json.loads((base / "reference_single.json").read_text())
    assert reference["eval_tokens"] == ours["eval_tokens"]
    assert ours["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("name,run,exact", [("evaluate_single", "single", True), ("evaluate_pp2_as_pp2", "pp2", True),
                                            ("evaluate_single_as_tp2", "single", False)])
def test_evaluate_reproduces_the_run_s_own_eval(base, name, run, exact):
    """The checkpoint evaluated again: in the layout that trained it, bit-identical to the run's
    evaluation of the same weights at that step; resharded into another layout, within 1e-6."""
    ours = next(e for e in _evals(base, run) if e["step"] == MID)
    record = json.loads((base / f"{name}.json").read_text())
    assert json.loads((base / f"{name}.txt").read_text().strip().splitlines()[-1]) == record  # printed as well
    assert record["step"] == MID and record["eval_tokens"] == ours["eval_tokens"]
    if exact:
        assert record == ours
    else:
        assert record["eval_loss"] == pytest.approx(ours["eval_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def init_differing(base) -> dict[str, list[str]]:
    """The tensors in which each layout's initial weights (and those of another seed) differ from
    the single process's."""
    out = {}
    for name in [*(x[0] for x in INIT_LAYOUTS), "seed8"]:
        weights, values, differ = differing(str(base / "init" / "single"), str(base / "init" / name))
        assert len(weights) >= 9 and values > 1_000_000, (weights, values)
        out[name] = differ
    return out


@pytest.mark.parametrize("name", [x[0] for x in INIT_LAYOUTS])
def test_layout_gets_identical_initial_weights(init_differing, name):
    assert init_differing[name] == []


def test_another_seed_gives_other_weights(init_differing):
    differ = init_differing["seed8"]
    assert "embedding.word_embeddings.weight" in differ and "output_layer.weight" in differ
    assert "decoder.final_layernorm.weight" not in differ  # norms start at ones in every seed
