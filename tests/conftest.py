"""Shared helpers: run the real CLI (plain python or torchrun with gloo) and read its metrics.

Tests live in tiers, each a folder and a marker (`pytest -m unit`): unit/ runs in this process,
dist/ trains or builds models in single- and multi-rank launches (the runs of one world size
batched into one launch by run_many), e2e/ drives the CLIs as a user does (exit codes, signals,
Slurm, DeepSpeed, conversions, the default run)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_MANY_MARK = "run_many: next command"  # tests/scripts/run_many.py prints it before each command
TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "dist", "e2e")


# The modules whose launches take longest, longest first. Under `-n 2 --dist loadfile
# --no-loadscope-reorder` (the README's test command) the workers take whole modules in collection
# order, so these start first and the quick in-process unit tier fills in at the end; xdist's own
# order (most tests first) would start the unit tier first and leave a few long launches for last.
LONGEST_FIRST = ("dist/test_parity.py", "e2e/test_deepspeed.py", "e2e/test_slurm.py", "dist/test_moe.py",
                 "dist/test_lora.py", "e2e/test_default_run.py", "e2e/test_signals.py", "dist/test_checkpoint.py",
                 "e2e/test_hf_convert.py", "dist/test_precision_aware.py", "e2e/test_moe_hf.py",
                 "dist/test_compiled_layers.py", "dist/test_moe_options.py")


def _schedule_rank(item: pytest.Item) -> tuple[int, int]:
    """Sort key: the LONGEST_FIRST modules in that order, then the other launches (dist, e2e), then unit."""
    path = Path(item.path).resolve()
    name = path.relative_to(TESTS).as_posix() if path.is_relative_to(TESTS) else path.name
    if name in LONGEST_FIRST:
        return 0, LONGEST_FIRST.index(name)
    return (2 if name.startswith("unit/") else 1), 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier (the folder under tests/ it lives in), so `-m unit` selects it,
    and order the modules for two workers (LONGEST_FIRST; the sort is stable, so tests keep their
    order within a module). Done here rather than in per-tier conftests: those would all be
    importable as `conftest`, shadowing this module's helpers that the tests import."""
    for item in items:
        path = Path(item.path).resolve()
        if path.is_relative_to(TESTS) and (tier := path.relative_to(TESTS).parts[0]) in TIERS:
            item.add_marker(tier)
    items.sort(key=_schedule_rank)

# Small, fast settings shared by the multi-process tests (fp32 on CPU).
FAST = ["train.seq_length=128", "train.global_batch_size=8", "train.micro_batch_size=2",
        "logging.wandb.mode=disabled", "logging.progress=false", "optim.warmup_steps=2"]
# The tiny model at half width (head dim 16, still 4 layers, 8 heads, 4 KV groups): what the runs of
# the default model check (layouts, resumes, signals, engines) does not depend on width, and on CPU
# their cost is mostly the matmuls, about 3x fewer FLOPs.
NARROW = ["model.hidden_size=128", "model.ffn_hidden_size=352"]


def cli_command(module: str, overrides: list[str], nproc: int = 1) -> list[str]:
    """`python -m <module>` (nproc=1) or `torchrun --standalone --nproc_per_node=N -m <module>`."""
    if nproc == 1:
        return [sys.executable, "-m", module, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *overrides]


def launch_env() -> dict[str, str]:
    """The environment of every process a test launches."""
    # This checkout's packages first, also from another cwd (an editable install may point elsewhere).
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    # Idle OpenMP threads sleep rather than spin: between the tiny models' ops (Python in the main
    # thread) a spinning second thread takes the core the other test worker's processes need.
    # One BLAS thread per process: the two test workers keep both cores busy, oversubscription
    # makes gloo runs crawl, and a tiny model's ops gain less from a second thread than they cost.
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": path}


def run_cli(module: str, overrides: list[str], *, nproc: int = 1, timeout: int = 900,
            check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """cli_command(module, overrides, nproc) run to its end in `cwd`, with launch_env()."""
    cmd = cli_command(module, overrides, nproc)
    proc = subprocess.run(cmd, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_many(commands: list[list[str]], *, nproc: int = 1, timeout: int = 900) -> list[str]:
    """Several `python -m` command lines ([module, *args]) in one launch of `nproc` ranks, in order
    (tests/scripts/run_many.py); each one's stdout. On CPU a tiny run costs mostly its launch:
    interpreter, imports, process group. `timeout`: seconds per command."""
    out = run_cli("tests.scripts.run_many", [json.dumps(commands)], nproc=nproc,
                  timeout=timeout * len(commands)).stdout
    outputs = out.split(f"\n{RUN_MANY_MARK}\n")[1:]
    assert len(outputs) == len(commands), out[-4000:]
    return outputs


def train_runs(base: Path, runs: list[tuple[str, list[str], int]], *, timeout: int = 900,
               then: list[tuple[str, list[str], int]] = ()) -> dict[str, list[dict]]:
    """Train each (name, overrides, nproc) into base/name; every run's metrics by name, its stdout in
    base/name/stdout.txt. The runs of one world size share one launch (run_many), in the given
    order; the launches go in the order their world size first appears. `then`: more commands
    (name, [module, *args], nproc) at the end of their world size's launch (after its runs), each
    one's stdout in base/<name>.txt. `timeout`: seconds per run."""
    for nproc in dict.fromkeys(n for *_, n in [*runs, *then]):
        names = [name for name, _, n in runs if n == nproc]
        extra = [(name, command) for name, command, n in then if n == nproc]
        outputs = run_many([*(["launcher.train", *overrides, f"run.dir={base / name}"]
                              for name, overrides, n in runs if n == nproc), *(command for _, command in extra)],
                           nproc=nproc, timeout=timeout)
        for name, text in zip(names, outputs):
            (base / name / "stdout.txt").write_text(text)
        for (name, _), text in zip(extra, outputs[len(names):]):
            (base / f"{name}.txt").write_text(text)
    return {name: read_metrics(base / name) for name, *_ in runs}


def main_in_process(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """`python -m <module> *argv` in this process (its `main(argv)`): (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(argv)
        sys.exit(0)
    out, err = capsys.readouterr()
    return done.value.code or 0, out, err


def config_error_line(proc: subprocess.CompletedProcess, key: str) -> str:
    """The run failed validation: exit 2 and exactly one stderr line `config error: <key>: ...`."""
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert lines == [lines[0]] and lines[0].startswith(f"config error: {key}: "), proc.stderr
    return lines[0]


def read_metrics(run_dir: Path, type: str = "train") -> list[dict]:
    """metrics.jsonl's train records (one per step), or `type=eval` / `all` (launcher.metrics.read_metrics)."""
    from launcher.metrics import read_metrics as read

    return read(run_dir, type=type)


def wandb_run_ids(directory: Path) -> list[str]:
    """The wandb run id of each offline run under directory/wandb, in start order."""
    # the id from each run's own file (run-<id>.wandb): two runs begun in the same second share a
    # directory stem and wandb suffixes the second one's name ("-1")
    files = sorted((directory / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    return [p.name[len("run-"):-len(".wandb")] for p in files]


@pytest.fixture(scope="session")
def cache_env():
    """The default corpus/tokenizer cache (built once, reused by every test)."""
    os.environ.setdefault("SHARDFORGE_CACHE", str(REPO / ".cache" / "shardforge"))
    return os.environ["SHARDFORGE_CACHE"]


def tiny_hf_model(family: str, config_cls: str, **config):
    """A random-weight transformers causal LM of `config_cls` (e.g. "LlamaConfig"), seeded by the
    family name so every test run converts the same weights."""
    import torch
    import transformers

    torch.manual_seed(sum(map(ord, family)))
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**config)).eval()
