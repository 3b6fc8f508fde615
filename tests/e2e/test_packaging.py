"""A non-editable install (a wheel built from the checkout) works from any directory: the console
scripts find the Hydra config tree and the Slurm template inside the installed package, and the
install declares what `logging.tensorboard=true` needs.

The wheel goes into a fresh venv; the dependencies come from the test interpreter's site-packages
(named in a .pth of plain paths, so an editable install of the checkout there is not activated),
nothing is downloaded."""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import FAST, REPO, read_metrics

SOURCES = ("setup.py", "launcher", "parallel", "models", "conf", "slurm")  # what the wheel is built from


def _copy_source(dest: Path) -> None:
    """The checkout's files as a clone has them (tracked, or new and not ignored): no build/ or caches."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SOURCES],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((REPO / name).read_bytes())


def test_wheel_install_runs_from_any_directory(cache_env, tmp_path):
    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "work"
    _copy_source(src)
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (purelib / "_test_dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    str(src)], cwd=work, env=env, check=True, capture_output=True)

    probe = subprocess.run([python, "-c", "import json, importlib.metadata as m, launcher; "
                            "print(json.dumps([launcher.__file__, m.requires('shardforge')]))"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    where, requires = json.loads(probe.stdout)
    assert Path(where).is_relative_to(purelib), where  # the installed copy, not the checkout
    assert any(r.replace(" ", "").startswith("tensorboard>=") for r in requires), requires

    helped = subprocess.run([bin_dir / "shardforge-train", "--help"], cwd=work, env=env, capture_output=True,
                            text=True)
    assert helped.returncode == 0 and "model=tiny" in helped.stdout, helped.stderr[-2000:]
    script = subprocess.run([bin_dir / "shardforge-submit", "cluster=slurm", "cluster.partition_required=false", "cluster.gpus_per_node=1",
                             "submit.dry_run=true", "run.dir=runs/slurm"], cwd=work, env=env, capture_output=True,
                            text=True)
    assert script.returncode == 0 and "#SBATCH --nodes=1" in script.stdout, script.stderr[-2000:]

    trained = subprocess.run([bin_dir / "shardforge-train", "train.steps=2", *FAST, "logging.tensorboard=true",
                              "checkpoint.final_save=false"], cwd=work, env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-4000:]
    run_dir = work / "runs" / "tiny"
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
