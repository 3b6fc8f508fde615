"""Where train.cuda_graph applies (parallel/cuda_graph.py): the resolved config of real runs
against the rules written out by hand (CUDA, megatron, dense, unpacked, pp=1; auto: one process).
The capture itself needs a GPU: gpu_tests/test_cuda_graph.py."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO
from parallel.cuda_graph import blockers, resolve


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("overrides,device,world,expected", [
    ([], "cuda", 1, True),                                   # the bench's case: dense, one GPU
    ([], "cpu", 1, False),
    (["train.cuda_graph=false"], "cuda", 1, False),
    ([], "cuda", 2, False),                                  # auto: one process only
    (["train.cuda_graph=true"], "cuda", 2, True),            # true: tp/dp allowed
    (["train.cuda_graph=true"], "auto", 8, True),            # a submit host: device not known yet
    (["model=mixtral_tiny"], "cuda", 1, False),
    (["parallel.engine=deepspeed"], "cuda", 1, False),
    (["data=indexed", "data.packing=true"], "cuda", 1, False),
    (["parallel.pp=2", "train.cuda_graph=true"], "cuda", 2, False),
])
def test_resolve(overrides, device, world, expected):
    cfg = _cfg(*overrides)
    assert resolve(cfg, device, world) is expected
    assert (not blockers(cfg, device, world)) == (expected or cfg.train.cuda_graph is False)
