"""`python -m tests.scripts.run_many COMMANDS_JSON` (plain or under torchrun): several `python -m`
command lines in one process, in order; COMMANDS_JSON is a list of [module, *args]. Each runs as
its own `python -m` would (`__main__`, its argv); one interpreter start-up, one set of imports
and, under torchrun, one process group (init_distributed/shutdown leave it up) serve them all,
which is most of what a tiny CPU run costs."""
from __future__ import annotations

import json
import os
import runpy
import sys

import torch
import torch.distributed as dist

from parallel.compat import defer_megatron_compile

MARK = "run_many: next command"  # before each command's output: tests/conftest.py splits there


def main(commands: list[list[str]]) -> None:
    defer_megatron_compile()  # as each command's own process would (launcher/cli.py)
    if "MASTER_ADDR" in os.environ:  # torchrun
        dist.init_process_group("gloo")
    for module, *args in commands:
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{MARK}", flush=True)
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as done:  # a command's successful exit ends only that command
            if done.code not in (None, 0):
                raise
        # A fresh compile per command, as in its own process: dynamo's cache would otherwise
        # count the earlier commands' graphs against its recompile limit.
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
