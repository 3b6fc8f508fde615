"""Slurm: launcher.submit against a real cluster started by the tests' own script (slurmctld, munged and
two slurmd as fake nodes on 127.0.0.1; tests/slurm_cluster/up.sh installs the packages when missing).

Every job is compared with an independent reference: the same config under plain torchrun.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import FAST, NARROW, REPO, config_error_line, read_metrics, run_cli, wandb_run_ids

CLUSTER_SCRIPTS = REPO / "tests" / "slurm_cluster"
GOLDEN = REPO / "tests" / "golden" / "submit_8x8.sbatch"
STEPS = 12
COMMON = [*FAST, *NARROW, f"train.steps={STEPS}"]
# CPU "nodes" of the test cluster: one process each, not exclusive (2 slots per fake node).
CPU_JOB = ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.exclusive=false", "cluster.time=00:15:00"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private Slurm cluster for this session (distinct dir, ports and node names), always torn down."""
    env = {**os.environ, "SLURM_TEST_DIR": os.environ.get("SHARDFORGE_SLURM_TEST_DIR", "/tmp/shardforge-slurm-tests"),
           "SLURM_TEST_NODES": "2", "SLURM_TEST_CTLD_PORT": "16937", "SLURM_TEST_SLURMD_BASE_PORT": "17240"}
    down = [str(CLUSTER_SCRIPTS / "down.sh")]
    subprocess.run(down, env=env, capture_output=True)  # leftovers of an interrupted session
    up = subprocess.run([str(CLUSTER_SCRIPTS / "up.sh")], env=env, capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        subprocess.run(down, env=env, capture_output=True)
        raise AssertionError(f"Slurm bring-up failed:\n{up.stdout}\n{up.stderr}")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = f"{env['SLURM_TEST_DIR']}/slurm.conf"
    try:
        yield Path(env["SLURM_TEST_DIR"])
    finally:
        subprocess.run(down, env=env, capture_output=True, timeout=300)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_env) -> list[dict]:
    """The independent reference: the same run under plain torchrun, 2 processes on this host."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_cli("launcher.train", [*COMMON, f"run.dir={run_dir}"], nproc=2)
    return read_metrics(run_dir)


def submit(overrides: list[str], *, multirun: bool = False) -> list[str]:
    proc = run_cli("launcher.submit", [*(["-m"] if multirun else []), *overrides])
    ids = re.findall(r"^submitted job (\d+)", proc.stdout, re.M)
    assert ids, proc.stdout
    for job in ids:  # where the log is and how to follow the job, printed at submit
        assert re.search(rf"tail -f \S+/slurm-{job}\.out", proc.stdout) and f"squeue -j {job}" in proc.stdout
    return ids


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job_id: str, run_dir: Path, timeout: float = 600) -> dict[str, str]:
    """Poll until the job ends (sbatch --wait polls every 10 s); assert it COMPLETED."""
    deadline = time.monotonic() + timeout
    while (info := job_info(job_id))["JobState"] not in DONE and time.monotonic() < deadline:
        time.sleep(0.5)
    log = run_dir / f"slurm-{job_id}.out"
    assert info["JobState"] == "COMPLETED", f"job {job_id}: {info['JobState']}\n" + \
        (log.read_text()[-6000:] if log.exists() else "(no log)")
    return info


def assert_same_losses(metrics: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in metrics] == [m["step"] for m in reference] == list(range(1, STEPS + 1))
    for got, want in zip(metrics, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (got["step"], got["loss"], want["loss"])


def assert_two_node_job(job: str, info: dict[str, str], run_dir: Path) -> str:
    """A 2-node job of 2 ranks, its first start logged; the job's log."""
    assert info["NumNodes"] == "2"
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert f"layout[world=2 tp=1 pp=1 cp=1 ep=1 dp=2]" in log and f"slurm_job={job} slurm_restart_count=0" in log
    assert (run_dir / "submit.sbatch").read_text().count(f"--nodes=2") == 1
    return log


def test_two_node_srun_job_matches_plain_torchrun(slurm_cluster, reference, tmp_path):
    """cluster.launcher=srun (one task per rank). The default launcher (torchrun on each node) runs
    the jobs of test_signalled_job_checkpoints_requeues_and_finishes_the_same, checked the same way."""
    run_dir = tmp_path / "run"
    (job,) = submit([*COMMON, *CPU_JOB, "cluster.nodes=2", "cluster.launcher=srun", f"run.dir={run_dir}"])
    info = wait_job(job, run_dir)
    assert info["Restarts"] == "0"
    assert_two_node_job(job, info, run_dir)
    assert_same_losses(read_metrics(run_dir), reference)


def wait_for_steps(run_dir: Path, n: int, timeout: float = 300) -> None:
    """Until the job has logged n steps (its ranks handle signals from their first step on)."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["usr1", "requeue"])
def test_signalled_job_checkpoints_requeues_and_finishes_the_same(how, slurm_cluster, reference, tmp_path):
    """usr1: what Slurm sends signal_grace_s before the time limit (to the batch script only); the job saves
    and requeues itself. requeue: `scontrol requeue`, as preemption does: TERM to every process, Slurm requeues."""
    run_dir = tmp_path / "run"
    wandb = "offline" if how == "usr1" else "disabled"  # one wandb check is enough (slow start)
    (job,) = submit([*COMMON, *CPU_JOB, "cluster.nodes=2", f"logging.wandb.mode={wandb}", f"run.dir={run_dir}"])
    wait_for_steps(run_dir, 2)
    if how == "usr1":
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job], check=True)
    info = wait_job(job, run_dir)
    assert info["Restarts"] == "1"
    log = assert_two_node_job(job, info, run_dir)
    signal = "SIGUSR1" if how == "usr1" else "SIGTERM"
    saved = re.search(rf"saved checkpoint .*iter_(\d+) after {signal}", log)
    assert saved, log[-6000:]
    if how == "usr1":
        assert "shardforge: saved; requeueing" in log
    stopped_at = int(saved.group(1))
    assert 2 <= stopped_at < STEPS
    assert f"steps={stopped_at}->{STEPS}" in log and "slurm_restart_count=1" in log
    # One curve 1..STEPS, the same as the uninterrupted reference, final loss included.
    assert_same_losses(read_metrics(run_dir), reference)
    assert read_metrics(run_dir)[-1]["loss"] == pytest.approx(reference[-1]["loss"], rel=1e-5)
    if how == "usr1":  # wandb resumed the same run: both starts logged into one run id
        ids = wandb_run_ids(run_dir)
        assert len(ids) == 2 and len(set(ids)) == 1, ids


def test_max_restarts_stops_requeueing(slurm_cluster, cache_env, tmp_path):
    run_dir = tmp_path / "run"
    (job,) = submit([*COMMON, *CPU_JOB, "cluster.nodes=1", "cluster.max_restarts=0", f"run.dir={run_dir}"])
    wait_for_steps(run_dir, 2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    deadline = time.monotonic() + 300
    while (info := job_info(job))["JobState"] not in DONE and time.monotonic() < deadline:
        time.sleep(0.5)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0" and info["Restarts"] == "0", log[-4000:]
    assert "cluster.max_restarts=0 reached: not requeued" in log
    assert (run_dir / "checkpoints" / "latest").is_file()  # saved before giving up


def test_multirun_submits_one_job_per_point(slurm_cluster, cache_env, tmp_path):
    lrs = ["1e-4", "3e-4"]
    ids = submit([*FAST, *NARROW, "train.steps=3", *CPU_JOB, "cluster.nodes=1", f"run.dir={tmp_path}",
                  f"optim.lr={','.join(lrs)}"], multirun=True)
    assert len(ids) == 2
    for n, (job, lr) in enumerate(zip(ids, lrs)):
        run_dir = tmp_path / f"{n}_optim.lr={float(lr)}"  # hydra writes 1e-4 as 0.0001
        wait_job(job, run_dir)
        assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        assert config["optim"]["lr"] == float(lr) and config["run"]["dir"] == str(run_dir)
        # its own checkpoints, where its own requeue would look for them
        assert (run_dir / "checkpoints" / "latest").is_file()
        assert f"CKPT_DIR={run_dir / 'checkpoints'}\n" in (run_dir / "submit.sbatch").read_text()


def test_multirun_points_cannot_share_a_checkpoint_dir(tmp_path):
    proc = run_cli("launcher.submit", ["-m", *CPU_JOB, f"run.dir={tmp_path}", f"checkpoint.dir={tmp_path / 'ck'}",
                                       "optim.lr=1e-4,3e-4", "submit.dry_run=true"], check=False)
    config_error_line(proc, "checkpoint.dir")


def test_srun_task_env_maps_to_torch_env():
    """cluster.launcher=srun: an srun task's SLURM_* become RANK/WORLD_SIZE/LOCAL_RANK (torchrun's own
    variables and a batch script's environment are left alone)."""
    from launcher.slurm_env import map_srun_env

    task = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
            "SLURM_STEP_NODELIST": "gpu[01-04]", "MASTER_ADDR": "gpu01"}
    assert map_srun_env(task)
    assert (task["RANK"], task["WORLD_SIZE"], task["LOCAL_RANK"], task["MASTER_ADDR"], task["MASTER_PORT"]) == \
           ("5", "8", "1", "gpu01", str(29500 + 1234))
    under_torchrun = {"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert not map_srun_env(under_torchrun) and under_torchrun["RANK"] == "3"
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}  # not a step: no STEP_NUM_TASKS
    assert not map_srun_env(batch_script) and "RANK" not in batch_script


def test_rendered_8x8_script_matches_golden():
    proc = run_cli("launcher.submit", [
        "cluster=slurm", "cluster.nodes=8", "cluster.gpus_per_node=8", "cluster.cpus_per_task=96",
        "cluster.partition=gpu", "cluster.account=llm", "cluster.qos=high", "cluster.time=2-00:00:00",
        "cluster.mem=0", "cluster.constraint=h100", "cluster.sbatch_extra=['--gres-flags=enforce-binding']",
        "cluster.setup=['module load cuda/12.4','source /opt/venvs/shardforge/bin/activate']",
        "+cluster.env.NCCL_SOCKET_IFNAME=ib0", "model=llama3_8b", "parallel.tp=8", "parallel.pp=2",
        "train.seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=512",
        "checkpoint.save_every=500", "run.dir=/scratch/shardforge/llama3_8b", "submit.dry_run=true"])
    rendered = re.sub(r"(# rendered: ).*", r"\1<date> in <workdir>", proc.stdout)
    rendered = rendered.replace(sys.executable, "<python>").replace(str(REPO), "<workdir>")  # (a venv may be in REPO)
    rendered = re.sub(r"--chdir=<workdir> +#", "--chdir=<workdir>  #", rendered)  # padding follows the path
    if os.environ.get("SHARDFORGE_UPDATE_GOLDEN"):  # after a reviewed change of the template
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text()


def test_dry_run_writes_nothing(tmp_path):
    run_cli("launcher.submit", [*CPU_JOB, f"run.dir={tmp_path / 'run'}", "submit.dry_run=true"])
    assert not (tmp_path / "run").exists()


def test_unreachable_controller_is_one_line(slurm_cluster, tmp_path):
    dead = tmp_path / "slurm.conf"  # the test cluster's config with a controller port nobody listens on
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=.*", "SlurmctldPort=1", (slurm_cluster / "slurm.conf").read_text()))
    env = {**os.environ, "SLURM_CONF": str(dead)}
    proc = subprocess.run([sys.executable, "-m", "launcher.submit", *CPU_JOB, f"run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "unreachable" in config_error_line(proc, "cluster.sbatch")


def test_missing_partition_is_one_line(slurm_cluster, tmp_path):
    """A cluster without a default partition (as many sites have) needs cluster.partition."""
    subprocess.run(["scontrol", "update", "PartitionName=debug", "Default=NO"], check=True)
    try:
        queued = job_count()
        proc = run_cli("launcher.submit", [*CPU_JOB, f"run.dir={tmp_path}"], check=False)
        assert "no default partition" in config_error_line(proc, "cluster.partition")
        proc = run_cli("launcher.submit", [*CPU_JOB, "cluster.partition=gpu", f"run.dir={tmp_path}"], check=False)
        assert "'gpu' is not a partition" in config_error_line(proc, "cluster.partition")
        assert job_count() == queued and not (tmp_path / "submit.sbatch").exists()
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=debug", "Default=YES"], check=True)


def job_count() -> int:
    return len(subprocess.run(["squeue", "-h", "-t", "all"], capture_output=True, text=True,
                              check=True).stdout.splitlines())
