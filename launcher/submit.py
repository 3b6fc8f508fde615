"""`python -m launcher.submit cluster=slurm [overrides]` — the training config as a Slurm job.

Validates the whole config for the cluster's world size (nodes × processes per node), renders
slurm/job.sbatch into `<run.dir>/submit.sbatch` and `sbatch`es it; `submit.dry_run=true` prints
the script only. `-m` (Hydra multirun) submits one job per sweep point, each in its own run dir
`<run.dir>/<n>_<swept key=value,...>`. The job requeues itself after a time-limit signal and
resumes from its own newest checkpoint (see slurm/job.sbatch).
"""
from __future__ import annotations

import datetime
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from launcher.cli import hydra_command
from launcher.config.schema import SlurmCluster, SubmitJobConfig
from launcher.config.validate import ConfigError, WorldSizeError, typed, validate
from launcher.package_data import SLURM_DIR

TEMPLATE = SLURM_DIR / "job.sbatch"
# Overrides the job gets from the rendered script itself (or that only the submitter reads).
_NOT_FORWARDED = ("submit", "cluster", "hydra", "run.dir", "checkpoint.load", "run.overwrite")


@dataclass(frozen=True)
class Job:
    run_dir: Path
    script: str            # the rendered sbatch script
    world_size: int


def procs_per_node(cluster: SlurmCluster) -> int:
    """Training processes per node: cluster.procs_per_node, else one per GPU, else 1 (CPU job)."""
    if cluster.procs_per_node is not None:
        return cluster.procs_per_node
    return cluster.gpus_per_node if cluster.gpus_per_node > 0 else 1


def _check_cluster(c: SlurmCluster) -> None:
    for key in ("nodes", "signal_grace_s", "max_restarts", "gpus_per_node", "rdzv_port_base"):
        value, low = getattr(c, key), 1 if key == "nodes" else 0
        if value < low:
            raise ConfigError(f"cluster.{key}", f"must be an integer >= {low}, got {value!r}")
    for key in ("procs_per_node", "cpus_per_task"):
        value = getattr(c, key)
        if value is not None and value < 1:
            raise ConfigError(f"cluster.{key}", f"must be null or a positive integer, got {value!r}")
    if c.gpus_per_node and c.procs_per_node not in (None, c.gpus_per_node):
        raise ConfigError("cluster.procs_per_node", f"{c.procs_per_node} processes per node with "
                                                    f"{c.gpus_per_node} GPUs: one process per GPU (or null)")
    if c.launcher not in ("torchrun", "srun"):
        raise ConfigError("cluster.launcher", f"must be torchrun or srun, got {c.launcher!r}")
    if c.partition_required not in ("auto", True, False):
        raise ConfigError("cluster.partition_required", f"must be auto, true or false, got {c.partition_required!r}")


# Rules that depend on the data-parallel size, which the cluster's world size sets.
_DP_BOUND = ("parallel.dp", "train.global_batch_size")


def _check_world(cfg: SubmitJobConfig) -> int:
    """World size of the job, validated against the parallel layout before anything is submitted
    (on the configured device: `auto` rules nothing out on a submit host)."""
    c = cfg.cluster
    per_node = procs_per_node(c)
    world = c.nodes * per_node
    try:
        validate(cfg, world, cfg.device)
    except WorldSizeError as err:  # the ranks the cluster gives do not fit the parallel layout
        raise ConfigError("cluster.nodes", f"{c.nodes} nodes x {per_node} processes per node = {world} ranks: "
                                           f"not divisible by {err.product} = {err.size}") from err
    except ConfigError as err:
        if err.key not in _DP_BOUND:
            raise
        # say where that world size comes from: the cluster, not a torchrun command line
        raise ConfigError(err.key, f"{err.reason} (world size {world} = cluster.nodes {c.nodes} x {per_node} "
                                   f"per node)") from err
    return world


def _slurm_command(c: SlurmCluster, name: str) -> str:
    """sinfo/scontrol next to the configured sbatch (same installation), else from PATH."""
    sibling = Path(shutil.which(c.sbatch) or c.sbatch).parent / name
    return str(sibling) if sibling.is_file() else name


def _check_slurm(c: SlurmCluster) -> None:
    """sbatch is there, the controller answers, and a partition is named where the cluster needs one."""
    if shutil.which(c.sbatch) is None:
        raise ConfigError("cluster.sbatch", f"{c.sbatch!r} not found on PATH (run launcher.submit on a Slurm "
                                            f"login node, or point cluster.sbatch at it)")
    sinfo = _slurm_command(c, "sinfo")
    try:
        out = subprocess.run([sinfo, "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError("cluster.sbatch", f"Slurm controller unreachable ({sinfo}: {err})") from err
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise ConfigError("cluster.sbatch", f"Slurm controller unreachable ({sinfo}: {why})")
    partitions = out.stdout.split()
    names = [p.rstrip("*") for p in partitions]
    if c.partition is None:
        has_default = any(p.endswith("*") for p in partitions)
        if c.partition_required is True or (c.partition_required == "auto" and not has_default):
            raise ConfigError("cluster.partition", f"this cluster has no default partition; set one of: "
                                                   f"{', '.join(names) or '(none listed)'}")
    elif c.partition_required != False and c.partition not in names:  # noqa: E712 (auto or true)
        raise ConfigError("cluster.partition", f"{c.partition!r} is not a partition of this cluster "
                                               f"(available: {', '.join(names)})")


def _forwarded_overrides(task_overrides: list[str]) -> list[str]:
    """The command line's training overrides, minus what the rendered script sets itself; a
    `model=<path>` as the user wrote it (the job resolves it again, launcher.model_path)."""
    from launcher.model_path import ORIGINAL

    keep = []
    for item in task_overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if not any(key == k or key.startswith((k + ".", k + "/")) for k in _NOT_FORWARDED):
            keep.append(ORIGINAL.get(item, item))
    return keep


def _directives(cfg: SubmitJobConfig, run_dir: Path, per_node: int) -> list[str]:
    c = cfg.cluster
    torchrun = c.launcher == "torchrun"
    lines = [
        (f"--job-name={c.job_name or run_dir.name}", None),
        (f"--nodes={c.nodes}", None),
        (f"--ntasks-per-node={1 if torchrun else per_node}",
         "one torchrun per node" if torchrun else "one task per training process"),
        (f"--gpus-per-node={c.gpus_per_node}" if c.gpus_per_node else None, None),
        (f"--cpus-per-task={c.cpus_per_task}" if c.cpus_per_task else None, None),
        (f"--partition={c.partition}" if c.partition else None, None),
        (f"--account={c.account}" if c.account else None, None),
        (f"--qos={c.qos}" if c.qos else None, None),
        (f"--time={c.time}" if c.time else None, None),
        (f"--mem={c.mem}" if c.mem is not None else None, None),
        (f"--constraint={c.constraint}" if c.constraint else None, None),
        ("--exclusive" if c.exclusive else None, None),
        (f"--output={run_dir}/slurm-%j.out", "stdout+stderr of every restart, appended"),
        ("--open-mode=append", None),
        ("--requeue" if c.requeue else "--no-requeue", None),
        # USR1: the signal launcher/loop.py saves on (besides TERM, which Slurm sends to every process itself)
        (f"--signal=B:USR1@{c.signal_grace_s}", f"USR1 to this script {c.signal_grace_s}s before the time limit"),
        (f"--chdir={Path.cwd()}", "relative paths in the config mean what they meant at submit"),
    ]
    lines += [(extra, "cluster.sbatch_extra") for extra in c.sbatch_extra]
    # Comments start at a fixed column (not the longest line's): the script stays stable across paths.
    return [f"{'#SBATCH ' + d:<36}  # {why}" if why else f"#SBATCH {d}" for d, why in lines if d]


def _launch(cfg: SubmitJobConfig, run_dir: Path, per_node: int, overrides: list[str]) -> str:
    c = cfg.cluster
    python = shlex.quote(c.python or sys.executable)
    train_args = [*map(_sh, overrides), _sh(f"run.dir={hydra_quote(str(run_dir))}"),
                  'checkpoint.load="$LOAD"', 'run.overwrite="$OVERWRITE"']
    # USR1 is ignored from the start (the default action would kill a process): torchrun never handles it,
    # the ranks handle it once training runs (launcher/loop.py installs the handler).
    ignore_usr1 = "bash -c 'trap \"\" USR1; exec \"$@\"' _"
    cpus = f" --cpus-per-task={c.cpus_per_task}" if c.cpus_per_task else ""
    if c.launcher == "torchrun":
        lines = [
            "# one torchrun per node; USR1 is ignored until the ranks' own handler takes over",
            f"srun --kill-on-bad-exit=1 --ntasks-per-node=1{cpus} {ignore_usr1} \\",
            f"  {python} -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" --nproc_per_node={per_node} \\",
            '    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" \\',
            "    -m launcher.train \\",
        ]
    else:
        lines = [
            "# one task per process: launcher.train takes RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/",
            "# SLURM_STEP_NUM_TASKS/SLURM_LOCALID; USR1 is ignored until the ranks' own handler takes over",
            f"srun --kill-on-bad-exit=1 --ntasks-per-node={per_node}{cpus} {ignore_usr1} \\",
            f"  {python} -m launcher.train \\",
        ]
    lines += [f"    {arg} \\" for arg in train_args[:-1]] + [f"    {train_args[-1]}"]
    return "\n".join(lines)


def hydra_quote(value: str) -> str:
    """A Hydra override value that stays one string whatever it holds (`=`, `,`, spaces in paths)."""
    if re.fullmatch(r"[\w/.+:@%~-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sh(arg: str) -> str:
    """Shell-quote for reading: bare when safe, "..." when that suffices, else shlex's '...'."""
    if shlex.quote(arg) == arg:
        return arg
    return f'"{arg}"' if not re.search(r'["$`\\!]', arg) else shlex.quote(arg)


def _environment(c: SlurmCluster) -> str:
    lines = [str(line) for line in c.setup]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in c.env.items()]
    return "\n".join(lines) or "# (none)"


def _render(template: str, values: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        return values[m.group(1)]  # a KeyError here is a template bug, not user input
    return re.sub(r"\{\{(\w+)\}\}", sub, template)


def _resume(first_load: str | None, overwrite: bool) -> str:
    """The script lines that pick checkpoint.load and run.overwrite for this start of the job: the
    user's for the first start; a requeued job resumes its own newest checkpoint, or, requeued
    before its first save, starts again with the partial run moved aside."""
    if first_load == "auto":
        lines = ["LOAD=auto"]
    else:
        value = "null" if first_load is None else hydra_quote(str(first_load))
        lines = [f"LOAD={_sh(value)}   # checkpoint.load, for the first start",
                 '[ -f "$CKPT_DIR/latest" ] && LOAD=auto']
    lines += [f"OVERWRITE={str(overwrite).lower()}   # run.overwrite, for the first start",
              'if [ "$RESTARTS" -gt 0 ]; then',
              '  if [ -f "$CKPT_DIR/latest" ]; then OVERWRITE=false; else OVERWRITE=true; fi',
              "fi"]
    return "\n".join(lines)


def build_job(cfg: SubmitJobConfig, run_dir: Path, overrides: list[str]) -> Job:
    """Validate `cfg` for its cluster and render the batch script (no Slurm needed)."""
    if not isinstance(cfg.cluster, SlurmCluster):
        raise ConfigError("cluster", f"launcher.submit needs a Slurm cluster (cluster=slurm), got "
                                     f"cluster={cfg.cluster.name}")
    _check_cluster(cfg.cluster)
    first_load = cfg.checkpoint.load
    world = _check_world(cfg)
    per_node = procs_per_node(cfg.cluster)
    c, p = cfg.cluster, cfg.parallel
    ckpt_dir = Path(cfg.checkpoint.dir).absolute()
    resume = _resume(first_load, cfg.run.overwrite)
    layout = f"{c.nodes} nodes x {per_node} processes = {world} (tp={p.tp} pp={p.pp} cp={p.cp} ep={p.ep} " \
             f"dp={world // (p.tp * p.pp * p.cp)}), launcher={c.launcher}"
    script = _render(TEMPLATE.read_text(), {
        "run_dir": str(run_dir), "run_dir_q": shlex.quote(str(run_dir)), "ckpt_dir_q": shlex.quote(str(ckpt_dir)),
        "layout": layout, "date": datetime.datetime.now().isoformat(timespec="seconds"), "workdir": str(Path.cwd()),
        "sbatch_directives": "\n".join(_directives(cfg, run_dir, per_node)),
        "max_restarts": str(c.max_restarts), "environment": _environment(c),
        "rdzv_port_base": str(c.rdzv_port_base),
        "resume": resume, "requeue": "1" if c.requeue else "0",
        "launch": _launch(cfg, run_dir, per_node, overrides),
    })
    return Job(run_dir=run_dir, script=script, world_size=world)


def _point_run_dir(cfg: DictConfig) -> Path:
    """run.dir, or under multirun <run.dir>/<n>_<swept key=value,...> so points never share a dir."""
    run_dir = Path(cfg.run.dir).absolute()
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return run_dir
    swept = _swept_keys()
    shared = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") == "checkpoint.dir"]
    if shared and "checkpoint.dir" not in swept:
        raise ConfigError("checkpoint.dir", "every sweep point would save to (and resume from) the same "
                                            "directory; leave it to its default under each point's run dir")
    point = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    return run_dir / re.sub(r"[/\s]", "_", "_".join([str(hc.job.num), ",".join(point)]).rstrip("_"))


def _swept_keys() -> set[str]:
    """Keys the command line sweeps (`key=a,b`, ranges, choice(...)): each job only sees its value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return {o.get_key_element().lstrip("+~") for o in OverridesParser.create().parse_overrides(args)
            if o.is_sweep_override()}


def submit(composed: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = _point_run_dir(composed)
    composed.run.dir = str(run_dir)  # what the job gets: ${run.dir} interpolations (checkpoint.dir) follow it
    overrides = _forwarded_overrides(list(hc.overrides.task))
    cfg = typed(composed)
    job = build_job(cfg, run_dir, overrides)
    if cfg.submit.dry_run:
        print(job.script, end="")
        return
    _check_slurm(cfg.cluster)
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / "submit.sbatch"
    script.write_text(job.script)
    proc = subprocess.run([cfg.cluster.sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        print(f"submit error: sbatch {script}: {why}", file=sys.stderr)
        sys.exit(1)
    job_id = proc.stdout.strip().split(";")[0]
    ckpt = Path(cfg.checkpoint.dir).absolute()
    resume = f" (resumes from {ckpt}, which has a checkpoint)" if (ckpt / "latest").is_file() else ""
    print(f"submitted job {job_id}: {job.world_size} ranks on {cfg.cluster.nodes} node(s){resume}\n"
          f"  script:  {script}\n"
          f"  log:     tail -f {run_dir}/slurm-{job_id}.out\n"
          f"  metrics: tail -f {run_dir}/metrics.jsonl\n"
          f"  status:  squeue -j {job_id}   |   scontrol show job {job_id}   |   sacct -j {job_id}\n"
          f"  stop:    scancel {job_id}   (save and requeue now: scancel --signal=USR1 --batch {job_id})",
          flush=True)


@hydra_command("submit")
def main(cfg: DictConfig) -> None:
    submit(cfg)


if __name__ == "__main__":
    main()
