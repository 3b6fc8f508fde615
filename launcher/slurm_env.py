"""Running inside a Slurm job: torch.distributed's env:// variables from an srun task's SLURM_* ones.

Under `srun python -m launcher.train` (cluster.launcher=srun: one task per process, no torchrun)
nothing sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; they follow from the step's
SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID, its first node and the job id. Under torchrun
RANK is already set and nothing changes; a batch script has no SLURM_STEP_NUM_TASKS (not a step).
"""
from __future__ import annotations

import os
import subprocess

RDZV_PORT_BASE = 29500  # as cluster.rdzv_port_base's default: base + job id % 20000 (stable across requeues)


def map_srun_env(env: dict[str, str] | None = None) -> bool:
    """Fill torch's rank variables from an srun task's environment; True when it did."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_STEP_NUM_TASKS" not in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env["SLURM_LOCALID"]
    if "MASTER_ADDR" not in env:  # the rendered sbatch exports it; a hand-written srun may not
        nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], capture_output=True,
                               text=True, check=True).stdout.split()
        env["MASTER_ADDR"] = nodes[0]
    env.setdefault("MASTER_PORT", str(RDZV_PORT_BASE + int(env["SLURM_JOB_ID"]) % 20000))
    return True


def restart_count() -> int | None:
    """SLURM_RESTART_COUNT of a requeued job (0 on its first start), None outside Slurm."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
