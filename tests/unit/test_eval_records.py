"""Eval records in metrics.jsonl (their own record type beside the per-step train records), what
`read_metrics` returns, and the run's picture (loss.png: train and eval loss, lr, tokens/s)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli
from launcher.metrics import MetricsLogger, eval_record, read_metrics
from launcher.plot import figure, plot_run


def _train(step: int) -> dict:
    return {"step": step, "loss": 5.0 - step / 10, "grad_norm": 1.0, "lr": 1e-3 * step, "tokens": 100 * step,
            "tokens_per_s": 1000.0 + step}


def _logged(run_dir, steps=6, every=3) -> None:
    logger = MetricsLogger(run_dir, total_steps=steps, start_step=0, progress=False, wandb_mode="disabled",
                           wandb_project="p", wandb_name=None, tensorboard=False, config={})
    for step in range(1, steps + 1):
        logger.log(_train(step))
        if step % every == 0:
            logger.log_eval(eval_record(step, loss_sum=3.0 * step * 40, num_tokens=40 * step))
    logger.close()


def test_eval_record_is_token_weighted():
    rec = eval_record(7, loss_sum=12.0, num_tokens=4)
    assert rec == {"type": "eval", "step": 7, "eval_loss": 3.0, "eval_tokens": 4, "eval_ppl": math.exp(3.0)}
    # a preference objective's eval loss is a mean over pairs: no perplexity
    assert eval_record(7, loss_sum=12.0, num_tokens=4, perplexity=False) == {"type": "eval", "step": 7,
                                                                            "eval_loss": 3.0, "eval_tokens": 4}


def test_read_metrics_keeps_train_records_apart(tmp_path):
    _logged(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r.get("type", "train"), r["step"]) for r in lines] == [
        ("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("train", 4), ("train", 5), ("train", 6), ("eval", 6)]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]  # existing readers: train only
    evals = read_metrics(tmp_path, type="eval")
    assert [(r["step"], r["eval_loss"], r["eval_tokens"]) for r in evals] == [(3, 3.0, 120), (6, 3.0, 240)]
    assert len(read_metrics(tmp_path, type="all")) == 8


def test_figure_draws_train_and_eval_loss_lr_and_throughput(tmp_path):
    _logged(tmp_path)
    fig = figure(read_metrics(tmp_path), read_metrics(tmp_path, type="eval"), title="run")
    loss, lr, speed = fig.axes
    lines = {line.get_label(): line for line in loss.get_lines()}
    assert list(lines["train"].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(lines["train"].get_ydata()) == pytest.approx([4.9, 4.8, 4.7, 4.6, 4.5, 4.4])
    assert list(lines["eval"].get_xdata()) == [3, 6] and list(lines["eval"].get_ydata()) == [3.0, 3.0]
    assert list(lr.get_lines()[0].get_ydata()) == pytest.approx([1e-3 * s for s in range(1, 7)])
    assert list(speed.get_lines()[0].get_ydata()) == [1001.0, 1002.0, 1003.0, 1004.0, 1005.0, 1006.0]


def test_plot_run_writes_loss_png(tmp_path):
    _logged(tmp_path)
    path = plot_run(tmp_path)
    assert path == tmp_path / "loss.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


def test_plot_cli(tmp_path):
    _logged(tmp_path)
    proc = run_cli("launcher.plot", [f"run.dir={tmp_path}"])
    assert (tmp_path / "loss.png").is_file() and str(tmp_path / "loss.png") in proc.stdout
    missing = run_cli("launcher.plot", [f"run.dir={tmp_path / 'nope'}"], check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"config error: run.dir: no metrics.jsonl in {tmp_path / 'nope'}"]
