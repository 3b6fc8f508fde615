"""Every bench writes one JSON result: the environment, the exact command and one row per run.

    {"env": {...versions, device, driver, date, commit}, "command": "python -m bench....",
     "rows": [{...one run or variant's numbers...}, ...], ...fields the bench adds}

By default it goes to bench/results/<date>_<device>_<bench>.json; a file that exists is never
overwritten (the next free name `-2`, `-3`, ... is taken instead), so a result, once written,
stays what that run measured. bench/results/ also holds the curated notes (markdown) that
bench/README.md draws its headline table from.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
PACKAGES = ("torch", "megatron-core", "transformers", "liger-kernel", "triton", "deepspeed")


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def _query(cmd: list[str]) -> str | None:
    """First line of a command's output, or None when it is missing or fails."""
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def environment() -> dict[str, Any]:
    """Versions, device, driver, UTC date and git commit. Call it after the bench's child processes
    exit: it initializes CUDA in this process."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "device_count": torch.cuda.device_count() if cuda else 0,
        "driver": _query(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "--id=0"]),
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        **{p: _version(p) for p in PACKAGES},
        **_source(),
    }


def _source() -> dict[str, Any]:
    """The commit the code is from. A copy of a working tree can carry git metadata that is not its
    own (an older HEAD; every later change then reads as "dirty"): SHARDFORGE_COMMIT, set by whoever
    made the copy, names the commit instead."""
    given = os.environ.get("SHARDFORGE_COMMIT")
    if given:
        return {"commit": given, "dirty": None, "commit_from": "SHARDFORGE_COMMIT"}
    return {"commit": _query(["git", "rev-parse", "HEAD"]),
            "dirty": bool(_query(["git", "status", "--porcelain", "--untracked-files=no"]))}


def invocation(module: str, argv: list[str] | None) -> str:
    """The command line that ran this bench (`argv` None: this process's own arguments)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def default_path(bench: str, env: dict[str, Any]) -> Path:
    """bench/results/<date>_<device>_<bench>.json, e.g. ..._nvidia-h200_train.json."""
    device = re.sub(r"[^a-z0-9]+", "-", str(env.get("device", "cpu")).lower()).strip("-") or "cpu"
    return RESULTS_DIR / f"{str(env['date'])[:10]}_{device}_{bench}.json"


def _free(path: Path) -> Path:
    if not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    return candidate


def write_result(path: str | Path | None, bench: str, command: str, rows: list[dict[str, Any]],
                 env: dict[str, Any] | None = None, **fields: Any) -> Path:
    """Write one result and return where it went. `path` None: default_path(bench); a path that
    exists is left alone and the next free `<stem>-N<suffix>` is written instead."""
    env = environment() if env is None else env
    target = Path(path) if path is not None else default_path(bench, env)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"bench": bench, "env": env, "command": command, "rows": rows, **fields}, indent=1,
                      default=str) + "\n"
    while True:
        target = _free(target)
        try:
            with target.open("x") as f:  # exclusive create: a file another run wrote meanwhile survives
                f.write(text)
            return target
        except FileExistsError:
            continue


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a result written by write_result."""
    return json.loads(Path(path).read_text())["rows"]
