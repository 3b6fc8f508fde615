"""`python -m launcher.plot run.dir=<run dir>` — the run's picture: `<run.dir>/loss.png`.

Three panels against the optimizer step, from metrics.jsonl: train loss with the eval loss of
each evaluation, the learning rate, and throughput (tokens/s). The training loop draws it at the
end of every run; this command draws it for any run directory, finished or still running.
matplotlib's Agg canvas draws it (no display, no global pyplot state).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from launcher.cli import hydra_command
from launcher.config.validate import ConfigError
from launcher.metrics import read_metrics

FILENAME = "loss.png"


def figure(train: list[dict[str, Any]], evals: list[dict[str, Any]], title: str = ""):
    """The matplotlib Figure of train records and eval records: loss, lr and tokens/s panels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 8))
    loss, lr, speed = fig.subplots(3, 1, sharex=True)
    # Fixed margins: a layout engine would cost more than drawing the figure.
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.06, top=0.94 if title else 0.98, hspace=0.08)
    steps = [r["step"] for r in train]
    loss.plot(steps, [r["loss"] for r in train], label="train", linewidth=1)
    if evals:
        loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    loss.set_ylabel("loss")
    loss.legend()
    loss.grid(alpha=0.3)
    lr.plot(steps, [r["lr"] for r in train])
    lr.set_ylabel("learning rate")
    lr.grid(alpha=0.3)
    speed.plot(steps, [r["tokens_per_s"] for r in train])
    speed.set_ylabel("tokens/s")
    speed.set_xlabel("step")
    speed.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_run(run_dir: str | os.PathLike) -> Path:
    """Draw `<run_dir>/loss.png` from its metrics.jsonl (written whole: temp file, then rename)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError("run.dir", f"no metrics.jsonl in {run_dir}")
    records = read_metrics(run_dir, type="all")
    train = [r for r in records if r.get("type", "train") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    path = run_dir / FILENAME
    tmp = run_dir / f"{FILENAME}.tmp{os.getpid()}"
    try:
        figure(train, evals, title=str(run_dir)).savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@hydra_command("plot", config_dir="tools")
def main(cfg: DictConfig) -> None:
    print(plot_run(cfg.run.dir))


if __name__ == "__main__":
    main()
