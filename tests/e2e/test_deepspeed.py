"""parallel.engine=deepspeed (ZeRO-3, CPU offload on and off) trains the same model as the megatron
engine: per-step loss and grad norm against a single-process megatron run, resume from a ZeRO-3
checkpoint, ZeRO-3 -> megatron / Hugging Face conversion, and its bad inputs. Real torchrun, 2
gloo ranks, fp32 on CPU. (The first offloaded run JIT-builds DeepSpeed's CPU Adam, once per machine.)"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import FAST, NARROW, config_error_line, read_metrics, run_cli, run_many, train_runs

STEPS = 6
MID = STEPS // 2  # evaluations at MID and STEPS; the offloaded run checkpoints at both
MID_CKPT, LAST_CKPT = f"iter_{MID:07d}", f"iter_{STEPS:07d}"
EVAL = ["data.split=98/2", f"eval.every={MID}", "eval.iters=2"]  # held-out documents
DS = ["parallel.engine=deepspeed"]
OFFLOAD = [*DS, "parallel.zero.offload_params=cpu", "parallel.zero.offload_optimizer=cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_env) -> Path:
    """Every training run the checks read, STEPS steps each, in two launches (ZeRO-3 on 2 ranks,
    then 1 process): ZeRO-3 with parameter and optimizer offload checkpointing at steps MID and STEPS
    ("offload_cpu"), without offload, under tp=2, the offloaded run resumed from step MID; the
    single-process megatron reference and ZeRO-3 in a plain one-process run. Metrics and stdout.txt
    under base/<name>. Every run evaluates on held-out documents; the 2-rank launch ends with
    `launcher.evaluate` of the offloaded run's step-MID checkpoint (its record in base/evaluate.json)."""
    base = tmp_path_factory.mktemp("deepspeed")
    common, once = [*FAST, *NARROW, f"train.steps={STEPS}", *EVAL], ["checkpoint.final_save=false"]
    evaluate = ["launcher.evaluate", *common, *OFFLOAD,
                f"checkpoint.load={base / 'offload_cpu' / 'checkpoints' / MID_CKPT}",
                f"evaluate.output={base / 'evaluate.json'}"]
    train_runs(base, [
        ("offload_cpu", [*common, *OFFLOAD, f"checkpoint.save_every={MID}"], 2),
        ("no_offload", [*common, *DS, *once], 2),
        ("tp2_offload_cpu", [*common, *OFFLOAD, "parallel.tp=2"], 2),
        ("resumed", [*common, *OFFLOAD, *once,
                     f"checkpoint.load={base / 'offload_cpu' / 'checkpoints' / MID_CKPT}"], 2),
        ("reference", [*common, *once], 1),
        ("one_process", [*common, *DS, *once], 1)],  # plain `python -m launcher.train`, no torchrun
        then=[("evaluate", evaluate, 2)])
    return base


@pytest.fixture(scope="module")
def reference(trained) -> list[dict]:
    """The single-process megatron run."""
    return read_metrics(trained / "reference")


@pytest.fixture(scope="module")
def offloaded(trained) -> tuple[Path, str, list[dict]]:
    """ZeRO-3 + parameter and optimizer offload, checkpoints at steps MID and STEPS: run dir, stdout, metrics."""
    run_dir = trained / "offload_cpu"
    return run_dir, (run_dir / "stdout.txt").read_text(), read_metrics(run_dir)


def _assert_same_curve(ref, got, steps, *, loss_rel, grad_rel):
    assert [m["step"] for m in got] == steps
    by_step = {m["step"]: m for m in ref}
    for m in got:
        r = by_step[m["step"]]
        assert m["loss"] == pytest.approx(r["loss"], rel=loss_rel), f"step {m['step']}"
        # Adam's first steps barely depend on gradient scale: the grad norm catches wrongly
        # scaled or wrongly averaged gradients that the loss would hide.
        assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=grad_rel), f"step {m['step']}"
        assert m["lr"] == pytest.approx(r["lr"], rel=1e-12)
        assert m["tokens"] == r["tokens"] and m["loss_tokens"] == r["loss_tokens"]
        assert set(m) >= {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s"}


@pytest.mark.parametrize("layout", ["offload_cpu", "no_offload", "tp2_offload_cpu", "one_process"])
def test_zero3_matches_megatron_single_process(layout, trained, reference, tmp_path):
    # tp2_offload_cpu: megatron-core TP layers, ZeRO-3 over each TP rank's DP group (here dp=1)
    ranks = 1 if layout == "one_process" else 2
    stdout, got = (trained / layout / "stdout.txt").read_text(), read_metrics(trained / layout)
    assert reference[-1]["loss"] < reference[0]["loss"]  # it trains at all
    _assert_same_curve(reference, got, list(range(1, STEPS + 1)), loss_rel=1e-4, grad_rel=1e-4)
    # zero.Init partitioned the model as it was built: rank 0 holds half of what the megatron
    # engine's single process holds, over DP or (tp2) as its TP slices
    held, whole = (float(re.search(r"params/rank\(0\)=([\d.]+)M", text).group(1))
                   for text in (stdout, (trained / "reference" / "stdout.txt").read_text()))
    assert held == pytest.approx(whole / ranks, abs=0.06)  # both printed to 0.1M
    if layout == "tp2_offload_cpu":  # zero_to_fp32 merges ZeRO partitions, not TP slices: a clear refusal
        conv = run_cli("launcher.convert", ["zero_to_megatron", f"checkpoint={trained / layout / 'checkpoints'}",
                                            f"out={tmp_path / 'converted'}"], check=False)
        assert conv.returncode == 2 and "tp=2 ZeRO-3 checkpoint" in conv.stderr, conv.stderr[-2000:]


@pytest.mark.parametrize("layout", ["offload_cpu", "no_offload", "tp2_offload_cpu", "one_process"])
def test_zero3_eval_loss_matches_megatron(layout, trained):
    reference, got = read_metrics(trained / "reference", type="eval"), read_metrics(trained / layout, type="eval")
    assert [e["step"] for e in got] == [e["step"] for e in reference] == [MID, STEPS]
    for ref, e in zip(reference, got):
        # the weights themselves agree to the training loss's tolerance after these steps
        assert e["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5), e["step"]
        assert e["eval_tokens"] == ref["eval_tokens"]


def test_zero3_evaluate_and_resume_reproduce_the_run_s_eval(trained):
    """The same ZeRO-3 weights evaluated again give the same numbers: launcher.evaluate of the step-MID
    checkpoint (bit-identical), the run resumed from it at step STEPS (same ranks, same state)."""
    run = read_metrics(trained / "offload_cpu", type="eval")
    assert json.loads((trained / "evaluate.json").read_text()) == run[0]
    resumed = read_metrics(trained / "resumed", type="eval")
    assert [e["step"] for e in resumed] == [STEPS]
    assert resumed[0]["eval_loss"] == pytest.approx(run[1]["eval_loss"], rel=1e-6)


def test_zero3_resume_continues_the_curve(trained, offloaded):
    run_dir, _, full = offloaded
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == LAST_CKPT
    assert sorted(p.name for p in ckpt.glob("iter_*")) == [MID_CKPT, LAST_CKPT]  # no .tmp left
    resumed = read_metrics(trained / "resumed")
    # Same ranks, same optimizer state and schedule: the same numbers, not just close ones.
    _assert_same_curve(full, resumed, list(range(MID + 1, STEPS + 1)), loss_rel=1e-6, grad_rel=1e-6)


@pytest.fixture(scope="module")
def converted(offloaded, tmp_path_factory) -> Path:
    """The offloaded run's final ZeRO-3 checkpoint through `launcher.convert zero_to_megatron` (to
    base/megatron) and `export_hf` (to base/hf), and what the tests below compute from those, in two
    launches (a tiny CPU run costs mostly its start-up): in one process the conversions and 3 steps
    of engine=megatron from the converted checkpoint (base/train_megatron); under torchrun with 2
    ranks tests/scripts/zero3_logits (base/logits.pt) and the same 3 steps under engine=deepspeed
    (base/train_zero3). Returns base."""
    base = tmp_path_factory.mktemp("converted")
    ckpt, out = offloaded[0] / "checkpoints", base / "megatron"
    load = [f"checkpoint.load={out}", "checkpoint.final_save=false", "train.steps=3"]
    run_many([["launcher.convert", "zero_to_megatron", f"checkpoint={ckpt}", f"out={out}"],
              # Straight to Hugging Face: export_hf takes the ZeRO-3 checkpoint itself.
              ["launcher.convert", "export_hf", f"checkpoint={ckpt}", f"out={base / 'hf'}"],
              ["launcher.train", *FAST, *NARROW, *load, f"run.dir={base / 'train_megatron'}"]])
    assert (out / "latest").read_text().strip() == "iter_0000000"
    run_many([["tests.scripts.zero3_logits", str(ckpt), str(out), str(base / "logits.pt"), "cpu"],
              ["launcher.train", *FAST, *NARROW, *DS, *load, f"run.dir={base / 'train_zero3'}"]], nproc=2)
    return base


def test_zero3_megatron_hf_conversions_give_identical_logits(converted):
    import transformers

    result = torch.load(converted / "logits.pt")
    # The same fp32 weights through the same GPTModel code: bit-identical logits, both ways.
    assert torch.equal(result["deepspeed"], result["megatron"])
    assert torch.equal(result["megatron_to_deepspeed"], result["megatron"])

    # Straight to Hugging Face: export_hf took the ZeRO-3 checkpoint itself.
    hf_dir = converted / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    vocab = model.config.vocab_size
    # the run's tokenizer travels through the ZeRO-3 checkpoint and the conversion
    assert (converted / "megatron" / "iter_0000000" / "tokenizer" / "tokenizer.model").is_file()
    assert transformers.AutoTokenizer.from_pretrained(hf_dir).eos_token_id == model.config.eos_token_id == 3
    with torch.no_grad():
        hf_logits = model(result["tokens"]).logits
    diff = (hf_logits - result["megatron"][..., :vocab]).abs().max().item()
    assert diff < 1e-5, f"exported model's logits differ by {diff:.2e}"


def test_megatron_checkpoint_trains_on_under_either_engine(converted, reference):
    """checkpoint.load of a megatron checkpoint: its weights, a fresh optimizer, step 0 — the same
    curve under engine=deepspeed (2 ranks, ZeRO-3) as under engine=megatron (1 process)."""
    ref, got = read_metrics(converted / "train_megatron"), read_metrics(converted / "train_zero3")
    assert ref[0]["loss"] < reference[0]["loss"] - 0.1  # the trained weights, not a fresh init, on batch 0
    _assert_same_curve(ref, got, [1, 2, 3], loss_rel=1e-5, grad_rel=1e-4)


def test_checkpoint_of_the_other_engine_is_a_config_error(offloaded, tmp_path):
    ckpt = offloaded[0] / "checkpoints"
    proc = run_cli("launcher.train", [*FAST, *NARROW, f"checkpoint.load={ckpt}", f"run.dir={tmp_path}"], check=False)
    assert "zero_to_megatron" in config_error_line(proc, "checkpoint.load")

