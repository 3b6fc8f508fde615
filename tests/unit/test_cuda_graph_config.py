"""Where train.cuda_graph applies (parallel/cuda_graph.py): the resolved config of real runs
against the rules written out by hand (CUDA, megatron, unpacked, pp=1, MoE only on the fused
dispatch where its layers keep the fused path; auto: one process).
The capture itself needs a GPU: gpu_tests/test_cuda_graph.py."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO
from launcher.config.validate import _fused_moe_fallbacks, typed, validate
from parallel.cuda_graph import blockers


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("overrides,device,world,expected", [
    ([], "cuda", 1, True),                                   # the bench's case: dense, one GPU
    ([], "cpu", 1, False),
    (["train.cuda_graph=false"], "cuda", 1, False),
    ([], "cuda", 2, False),                                  # auto: one process only
    (["train.cuda_graph=true"], "cuda", 2, True),            # true: tp/dp allowed
    (["train.cuda_graph=true", "train.micro_batch_size=1"], "auto", 8, True),  # a submit host: device unknown
    (["model=mixtral_tiny"], "cuda", 1, True),                                     # the default dispatch: fused
    (["model=mixtral_tiny", "train.cuda_graph=true"], "cuda", 1, True),
    (["model=mixtral_tiny", "train.moe_dispatch=megatron"], "cuda", 1, False),     # host copies of token counts
    # the fused layers' fallbacks to megatron's dispatch
    (["model=mixtral_tiny", "model.moe_expert_capacity_factor=1.0"], "cuda", 1, False),
    (["model=mixtral_tiny", "train.precision=fp32"], "cuda", 1, False),
    (["model=mixtral_tiny", "train.recompute=[moe_act]"], "cuda", 1, False),
    (["model=mixtral_tiny", "train.recompute=full"], "cuda", 1, True),
    (["parallel.engine=deepspeed"], "cuda", 1, False),
    (["data=indexed", "data.prefixes=[x]", "data.tokenizer=t", "data.packing=true"], "cuda", 1, False),
    (["parallel.pp=2"], "cuda", 2, False),
    (["optim.cpu_offload=true"], "cuda", 1, False),                                 # auto: not offloaded
    (["optim.cpu_offload=true", "train.cuda_graph=true"], "cuda", 1, True),
])
def test_resolve(overrides, device, world, expected):
    cfg = _cfg(*overrides)
    assert validate(cfg, world, device).cuda_graph is expected
    c = typed(cfg)
    moe = c.model.num_experts is not None
    why = blockers(c.train.cuda_graph, device_type=device, world_size=world, engine=c.parallel.engine,
                   moe_dispatch=c.train.moe_dispatch if moe else None,
                   packing=c.data.packing, pp=c.parallel.pp, cpu_offload=c.optim.cpu_offload,
                   moe_fallbacks=_fused_moe_fallbacks(c, device) if moe else [])
    assert (not why) == (expected or c.train.cuda_graph is False)


def test_true_where_it_cannot_apply_names_every_reason():
    from launcher.config.validate import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(_cfg("train.cuda_graph=true", "parallel.pp=2", "model=mixtral_tiny", "train.moe_dispatch=megatron",
                      "train.global_batch_size=16"), 2, "cpu")
    assert err.value.key == "train.cuda_graph"
    for words in ("needs device=cuda", "mixture of experts on megatron's dispatch", "pipeline parallel"):
        assert words in err.value.reason
    with pytest.raises(ConfigError) as err:  # the fused dispatch lifts only the MoE reason
        validate(_cfg("train.cuda_graph=true", "parallel.pp=2", "model=mixtral_tiny", "train.moe_dispatch=fused",
                      "train.global_batch_size=16"), 2, "cpu")
    assert "mixture of experts" not in err.value.reason and "pipeline parallel" in err.value.reason
    with pytest.raises(ConfigError) as err:  # true where the fused layers would fall back: each reason named
        validate(_cfg("train.cuda_graph=true", "model=mixtral_tiny", "model.moe_expert_capacity_factor=1.0",
                      "train.precision=fp32"), 1, "cuda")
    assert "token capacity" in err.value.reason and "not in bf16" in err.value.reason
