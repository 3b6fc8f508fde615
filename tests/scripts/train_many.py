"""`python -m tests.scripts.train_many RUNS_JSON` (plain or under torchrun): several `launcher.train`
runs in one process, in order, RUNS_JSON a list of override lists (each one run's command line).
One interpreter start-up, one set of imports and, under torchrun, one process group serve them
all, which is most of what a tiny CPU run costs."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from launcher.train import run

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def main(runs: list[list[str]]) -> None:
    if "MASTER_ADDR" in os.environ:  # torchrun: one process group for every run (shutdown leaves it up)
        dist.init_process_group("gloo")
    for overrides in runs:
        if os.environ.get("RANK", "0") == "0":  # where tests/conftest.py splits the output by run
            print("\ntrain_many: next run", flush=True)
        with initialize_config_dir(config_dir=CONF, version_base=None):
            cfg = compose("config", overrides=overrides)
        run(cfg)
        # A fresh compile per run, as in its own process: dynamo's cache would otherwise count
        # the earlier runs' graphs against its recompile limit.
        torch._dynamo.reset()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
