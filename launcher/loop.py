"""The training loop: batches in, optimizer steps out, metrics and checkpoints on the way.

SIGTERM / SIGUSR1 (preemption, Slurm's `--signal`) and SIGINT (Ctrl-C) finish the current step
(on GPU also the next: the flag is read a step late), save a checkpoint and end the run with exit
code 0, so a requeued job resumes from `latest`. A second Ctrl-C aborts at once (exit 130).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from launcher import checkpoint
from launcher.checkpoint_files import checkpoint_files
from launcher.config.schema import JobConfig
from launcher.data.tokenizer import Tokenizer
from launcher.flops import peak_flops, train_flops_per_token
from launcher.host_memory import host_memory
from launcher.metrics import MetricsLogger, StepTimer, eval_record
from launcher.plot import FILENAME, plot_run
from launcher.profiling import MemorySnapshot, StepProfiler
from models.args import ModelArgs
from parallel.engine import Engine, HostCopy, StepResult


def _no_stats(**_: int) -> dict[str, float]:
    return {}


@dataclass
class TrainData:
    """`batches(step=, dp_rank=, dp_size=, micro_batch_size=, global_batch_size=)` -> this rank's
    micro batches of that step; `step_stats(step=, global_batch_size=)` -> that step's data metrics
    over its whole global batch (padding fraction ...), {} where there are none; `tokenizer` the data's tokenizer,
    saved with every checkpoint; `valid`, when the run evaluates, the validation batches in the same
    form (step = eval batch); `preference` and `valid_preference`, under a preference objective, the
    training and validation pairs' batchers (launcher/data/preference_batches.py), which DPO's
    reference log-probs are attached to."""
    batches: Callable[..., list[dict[str, Any]]]
    step_stats: Callable[..., dict[str, float]] = _no_stats
    tokenizer: Tokenizer | None = None
    valid: Callable[..., list[dict[str, Any]]] | None = None
    preference: Any = None
    valid_preference: Any = None


def evaluate(engine: Engine, valid: Callable[..., list[dict[str, Any]]], *, iters: int, micro_batch_size: int,
             global_batch_size: int) -> tuple[float, int]:
    """(loss sum, loss tokens) over the first `iters` validation batches (collective): the
    token-weighted loss is their ratio, as training's loss is over a global batch."""
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    loss_sum, num_tokens = 0.0, 0
    for k in range(iters):
        batches = valid(step=k, dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=micro_batch_size,
                        global_batch_size=global_batch_size)
        s, n = engine.eval_step(batches)
        loss_sum, num_tokens = loss_sum + s, num_tokens + n
    return loss_sum, num_tokens


def train(cfg: JobConfig, engine: Engine, data: TrainData, args: ModelArgs, start_step: int) -> None:
    t = cfg.train
    device = engine.device
    rank0 = dist.get_rank() == 0
    stop = _StopOnSignal(device, announce=rank0)  # from here on a signal saves what was trained
    tokens_per_step = t.global_batch_size * t.seq_length
    flops_per_token = train_flops_per_token(seq_length=t.seq_length, **args.flops_shape())
    peak = peak_flops(device)
    logger = None
    if rank0:
        logger = MetricsLogger(cfg.run.dir, total_steps=t.steps, start_step=start_step,
                               progress=cfg.logging.progress, wandb_mode=cfg.logging.wandb.mode,
                               wandb_project=cfg.logging.wandb.project, wandb_name=cfg.logging.wandb.name,
                               tensorboard=cfg.logging.tensorboard,
                               config=asdict(cfg))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    profiler = StepProfiler(cfg.logging.profile_steps, cfg.run.dir, device, enabled=rank0)
    memory = MemorySnapshot(cfg.logging.memory_snapshot, cfg.run.dir, device, enabled=rank0)
    files = checkpoint_files(asdict(cfg.model), data.tokenizer)  # every checkpoint is usable on its own

    def report(done: int, result: StepResult, seconds: Callable[[], float]) -> None:
        if not rank0 or (done % t.log_every and done != t.steps):
            return
        elapsed = seconds()
        record: dict[str, Any] = {
            "step": done, "loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
            "tokens": done * tokens_per_step, "tokens_per_s": tokens_per_step / elapsed,
            "step_time_s": elapsed,
            # tokens that carry a loss (excludes padding, document ends, SFT prompts); under a
            # preference objective the loss is a mean over pairs, and this counts the pairs
            "loss_tokens": result.num_tokens, "loss_tokens_per_s": result.num_tokens / elapsed,
            **data.step_stats(step=done - 1, global_batch_size=t.global_batch_size),
            **result.moe,
            **result.metrics,
        }
        if peak is not None:
            record["mfu"] = flops_per_token * tokens_per_step / elapsed / (peak * dist.get_world_size())
        if device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if done == t.steps:  # this process's host memory by component (launcher/host_memory.py)
            modules = getattr(engine, "chunks", None) or [engine.module]
            record.update(host_memory(engine.optimizer, (p for m in modules for p in m.parameters())))
        logger.log(record)

    def run_eval(done: int) -> None:
        loss_sum, num_tokens = evaluate(engine, data.valid, iters=cfg.eval.iters, micro_batch_size=t.micro_batch_size,
                                        global_batch_size=t.global_batch_size)
        if logger is not None:
            logger.log_eval(eval_record(done, loss_sum=loss_sum, num_tokens=num_tokens,
                                        perplexity=cfg.train.objective == "lm"))
        timer.restart()  # keep evaluation time out of the next step's throughput

    # A step is reported once the next one is queued: the GPU never waits for the host to read
    # numbers (loss, grad norm, the stop flag) that would make it drain its queue.
    pending: tuple | None = None
    done = start_step
    for step in range(start_step, t.steps):
        profiler.before_step(step + 1)
        batches = data.batches(step=step, dp_rank=dp_rank, dp_size=dp_size,
                               micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size)
        result = engine.train_step(batches)
        done = step + 1
        seconds = timer.lap()
        stop.poll()
        if pending is not None:
            report(*pending)
        pending = (done, result, seconds)
        profiler.after_step(done)
        memory.after_step(done)
        if stop.signal:
            break
        if data.valid is not None and ((cfg.eval.every and done % cfg.eval.every == 0)
                                       or (cfg.eval.at_end and done == t.steps)):
            report(*pending)  # the step's record precedes its evaluation's
            pending = None
            run_eval(done)
        if cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0 and done != t.steps:
            if pending is not None:
                report(*pending)
            pending = None
            checkpoint.save(engine, cfg.checkpoint.dir, done, keep_last=cfg.checkpoint.keep_last, files=files)
            timer.restart()  # keep save time out of the next step's throughput
    if pending is not None:
        report(*pending)
    if (cfg.checkpoint.final_save or stop.signal) and done > start_step:
        path = checkpoint.save(engine, cfg.checkpoint.dir, done, keep_last=cfg.checkpoint.keep_last, files=files)
        if rank0:
            why = f" after {stop.signal}" if stop.signal else ""
            print(f"saved checkpoint {path}{why}", flush=True)
    if logger is not None:
        logger.close()
        try:  # the run's work is saved by now: a picture that cannot be drawn costs one line
            print(f"plot: {plot_run(cfg.run.dir)}", flush=True)
        except (OSError, ValueError) as err:
            print(f"plot: {FILENAME} not written: {err}", file=sys.stderr, flush=True)
    stop.restore()


class _StopOnSignal:
    """Records SIGTERM/SIGUSR1/SIGINT; every rank learns of a signal any rank got, at the same step.

    `poll` after each step reduces the flag over all ranks; on GPU its result is read at the
    next poll (a pinned copy and an event), so every rank stops one step after the signal.

    A second SIGINT ends the process at once with exit code 130, unless it comes within
    `INTERRUPT_ECHO_S` of the first: torchrun passes the terminal's Ctrl-C on to its workers, so
    each worker of a torchrun job gets one keypress twice."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    INTERRUPT_ECHO_S = 1.0

    def __init__(self, device: torch.device, announce: bool = True):
        self.signal: str | None = None
        self._got = 0
        self._interrupted_at: float | None = None
        self._announce = announce
        self._device = device
        self._queued: HostCopy | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is not None:
                if now - self._interrupted_at > self.INTERRUPT_ECHO_S:
                    print("shardforge: interrupted again: aborting without saving", file=sys.stderr, flush=True)
                    os._exit(130)
                return
            self._interrupted_at = now
            if self._announce:
                print("shardforge: interrupted: finishing this step and saving a checkpoint "
                      "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
        self._got = self._got or signum

    def restore(self) -> None:
        """Give the signals back to the handlers they had before training."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def poll(self) -> None:
        # torch.full, not torch.tensor: a host-to-device copy would wait for the queued step.
        flag = torch.full((1,), self._got, dtype=torch.int64, device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self._device.type != "cuda":
            self._read(flag)
            return
        if self._queued is not None:
            self._read(self._queued.get())
        self._queued = HostCopy(flag)

    def _read(self, flag: torch.Tensor) -> None:
        if flag.item() and self.signal is None:
            self.signal = signal.Signals(int(flag.item())).name
