"""Per-step metrics: `<run.dir>/metrics.jsonl`, a live progress line, and wandb/TensorBoard.

Only global rank 0 writes; a resumed run appends to the same metrics.jsonl and wandb run
(launcher/run_dir.py). Each line of metrics.jsonl is one record. A train record (no `type` key)
is one optimizer step:
    step, loss, grad_norm, lr, tokens (cumulative), tokens_per_s, step_time_s
    and on GPU also mfu and peak_mem_gb; MoE models add moe_load_min/max/mean, moe_imbalance
    (max/mean expert load), moe_imbalance_worst_layer, moe_aux_loss (or moe_seq_aux_loss),
    moe_z_loss when enabled and moe_dropped_fraction with a capacity factor. The last step's
    record adds rank 0's host memory by component (host_*_gb: launcher/host_memory.py).
An eval record is one evaluation on the validation data after `step` optimizer steps:
    type: "eval", step, eval_loss (token-weighted, as the train loss), eval_tokens, eval_ppl (not
    under a preference objective, whose eval_loss is a mean over pairs and eval_tokens counts them)
`read_metrics` reads either kind.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from launcher import run_dir as run_dir_files


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, *, total_steps: int, start_step: int, progress: bool,
                 wandb_mode: str, wandb_project: str, wandb_name: str | None, tensorboard: bool,
                 config: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run appends after the steps its checkpoint holds: the steps it trains again are
        # dropped, not duplicated. (A fresh start never finds a previous run's file here: validation
        # refuses one, and run.overwrite moves it aside first.)
        if start_step > 0:
            run_dir_files.trim_metrics(self.run_dir, start_step)
        self._file = open(self.run_dir / run_dir_files.METRICS, "a", buffering=1)
        self._postfix: dict[str, str] = {}
        self._eval_postfix: dict[str, str] = {}
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         dynamic_ncols=True, disable=not progress)
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            # An absolute dir: a wandb-core service inherited through WANDB_SERVICE (started by
            # another process in another cwd) would resolve a relative one against its own cwd.
            self._wandb = wandb.init(project=wandb_project, name=wandb_name, mode=wandb_mode,
                                     dir=str(self.run_dir.resolve()), config=config, resume="allow",
                                     id=run_dir_files.wandb_run_id(self.run_dir, resuming=start_step > 0))
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._postfix = dict(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                             **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}),
                             **({"aux": f"{record['moe_aux_loss']:.3f}"} if "moe_aux_loss" in record else {}),
                             **({"imb": f"{record['moe_imbalance']:.2f}"} if "moe_imbalance" in record else {}))
        self._bar.set_postfix(**self._postfix, **self._eval_postfix)  # the latest eval loss stays on the line
        self._bar.update(1)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def log_eval(self, record: dict[str, Any]) -> None:
        """An eval record (`eval_record`): into metrics.jsonl, the progress line, wandb and TensorBoard."""
        self._file.write(json.dumps(record) + "\n")
        self._eval_postfix = {"eval_loss": f"{record['eval_loss']:.4f}"}
        self._bar.set_postfix(**self._postfix, **self._eval_postfix)
        scalars = {k: v for k, v in record.items() if k not in ("type", "step")}
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def eval_record(step: int, *, loss_sum: float, num_tokens: int, perplexity: bool = True) -> dict[str, Any]:
    """The metrics.jsonl record of one evaluation after `step` optimizer steps; `perplexity`: the loss is a
    mean token cross entropy, whose exp is one."""
    loss = loss_sum / max(num_tokens, 1)
    record = {"type": "eval", "step": step, "eval_loss": loss, "eval_tokens": int(num_tokens)}
    if perplexity:
        record["eval_ppl"] = math.exp(min(loss, 700.0))  # (exp overflows a float past ~709)
    return record


def read_metrics(run_dir: str | os.PathLike, type: str = "train") -> list[dict[str, Any]]:
    """metrics.jsonl's records of one type: `train` (one per step; what readers of the per-step
    metrics expect), `eval`, or `all` in file order."""
    path = Path(run_dir) / run_dir_files.METRICS
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records if type == "all" else [r for r in records if r.get("type", "train") == type]


class StepTimer:
    """Time from one step's end to the next's. On GPU the ends are CUDA events: reading a lap waits
    for that step's kernels only, not for the next step the loop has queued meanwhile, and the
    interval covers whatever the GPU did, idle waits for the host included."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._last = self._mark()

    def _mark(self) -> Any:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self) -> Callable[[], float]:
        """Marks a step's end; returns a function giving the seconds since the previous mark."""
        start, end = self._last, self._mark()
        self._last = end
        if not self._cuda:
            return lambda: end - start

        def seconds() -> float:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return seconds

    def restart(self) -> None:
        """The next lap starts now (keeps a checkpoint save out of the next step's time)."""
        self._last = self._mark()
