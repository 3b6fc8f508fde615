"""Shared set-up of the GPU tests."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def build_engine(monkeypatch):
    """`build(model, seed=, seq_length=, micro_batch_size=, params_dtype=, steps=1, fusion=False, recompute=None,
    fp8=False, moe_dispatch="megatron", objective=ObjectiveConfig())`
    -> (ModelArgs, MegatronEngine) of conf/model/<model>.yaml on one GPU, torch backend. Process
    groups start at the first build and shut down after the test. fusion=False sends the weight
    gradients to autograd instead of adding them into DDP's main_grad inside the GEMM."""
    from models.args import ModelArgs
    from parallel import grad_accum_fusion
    from parallel.engine_config import OptimConfig
    from parallel.layout import Layout
    from parallel.megatron_engine import MegatronEngine, init_distributed, shutdown

    enable, started = grad_accum_fusion.enable, []
    device = torch.device("cuda")

    def build(model: str, *, seed: int, seq_length: int, micro_batch_size: int, params_dtype: torch.dtype,
              steps: int = 1, fusion: bool = False, recompute: str | list[str] | None = None, fp8: bool = False,
              moe_dispatch: str = "megatron", objective=None):
        if not started:
            init_distributed(Layout(world_size=1), device, seed=seed)
            started.append(True)
        monkeypatch.setattr(grad_accum_fusion, "enable", lambda d: fusion and enable(d))
        args = ModelArgs.from_config(OmegaConf.load(f"{REPO}/conf/model/{model}.yaml"))
        engine = MegatronEngine(args, Layout(world_size=1), OptimConfig(),
                                steps=steps, seq_length=seq_length, micro_batch_size=micro_batch_size, seed=seed,
                                device=device, params_dtype=params_dtype, recompute=recompute, backend="torch",
                                fp8=fp8, moe_dispatch=moe_dispatch,
                                **({"objective": objective} if objective is not None else {}))
        return args, engine

    yield build
    if started:
        shutdown()
