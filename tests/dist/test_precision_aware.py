"""optim.precision_aware (parallel/fused_adam.py) in whole runs against megatron-core's fp32-master
distributed optimizer (curves, and checkpoints crossing between the two); the update itself is
tests/unit/test_fused_adam.py."""
from __future__ import annotations

import pytest

from conftest import FAST, NARROW, train_runs


BF16 = [*FAST, *NARROW, "train.precision=bf16", "train.steps=6", "checkpoint.final_save=false"]


def _losses(metrics):
    return [(m["step"], m["loss"], m["grad_norm"]) for m in metrics]


def _close(a, b, rtol):
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(a, b):
        assert abs(loss - ref_loss) <= rtol * abs(ref_loss), (step, loss, ref_loss)
        assert abs(norm - ref_norm) <= 10 * rtol * ref_norm, (step, norm, ref_norm)


PARALLEL = [
    ("dp2_bf16_grads_stochastic", ["optim.main_grads_dtype=bf16", "optim.master_weights=stochastic"], 2),
    ("tp2_bf16_moments", ["parallel.tp=2", "optim.moments_dtype=bf16"], 2),
    ("pp2_bf16_grads_stochastic", ["parallel.pp=2", "optim.main_grads_dtype=bf16",
                                   "optim.master_weights=stochastic"], 2),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_env) -> dict[str, list[tuple]]:
    """Losses and grad norms by run: megatron-core's own fp32-master distributed optimizer ("plain",
    one process, bf16), the precision-aware variants, the parallel layouts, and the resumes from
    step 3 of a checkpoint saved by another optimizer setting."""
    base = tmp_path_factory.mktemp("precision_aware")
    aware, save = ["optim.precision_aware=true"], ["checkpoint.save_every=3"]
    offload = ["optim.cpu_offload=true"]

    def run(name: str, overrides: list[str], nproc: int = 1, load: str | None = None):
        resume = [f"checkpoint.load={base / load / 'ckpt' / 'iter_0000003'}"] if load else []
        return name, [*BF16, *overrides, f"checkpoint.dir={base / name / 'ckpt'}", *resume], nproc

    # The resumes share the one-process launch of the runs whose checkpoints they load, after them (a
    # launch runs its commands in order): one launch fewer, each costing an interpreter and its imports.
    metrics = train_runs(base, [
        run("plain", save), run("aware", [*aware, *save]),
        run("bf16_moments", [*aware, "optim.moments_dtype=bf16"]),  # the buffer DDP accumulates in
        run("bf16_grads", [*aware, "optim.main_grads_dtype=bf16"]),
        run("stochastic", [*aware, "optim.master_weights=stochastic", *save]),
        run("offload", [*offload, *save]),
        run("offload_bf16_grads", [*offload, "optim.main_grads_dtype=bf16"]),
        run("from_plain", aware, load="plain"), run("from_aware", [], load="aware"),
        run("from_stochastic", aware, load="stochastic"), run("from_offload", offload, load="offload"),
        *[run(name, [*aware, *extra], n) for name, extra, n in PARALLEL]])
    return {name: _losses(metrics) for name, metrics in metrics.items()}


def test_runs_and_checkpoints_match_the_fp32_master_optimizer(trained):
    """bf16 on CPU, 6 steps: precision_aware (fp32 moments) trains the same curve as megatron's
    fp32-master optimizer; a checkpoint of either resumes in the other on that curve."""
    reference = trained["plain"]
    _close(trained["aware"], reference, rtol=1e-3)
    _close(trained["from_plain"], reference[3:], rtol=1e-3)
    _close(trained["from_aware"], reference[3:], rtol=1e-3)
    # bf16 moments: the same curve within bf16 tolerance.
    _close(trained["bf16_moments"], reference, rtol=1e-2)
    # bf16 main grads (the buffer DDP accumulates in): the same curve within bf16 tolerance.
    _close(trained["bf16_grads"], reference, rtol=1e-2)
    # No master weights, stochastic rounding: the same curve within bf16 tolerance; its checkpoint
    # (the bf16 params as fp32 masters) resumes with exact masters on that curve.
    _close(trained["stochastic"], reference, rtol=1e-2)
    _close(trained["from_stochastic"], reference[3:], rtol=1e-2)


def test_offloaded_optimizer_trains_the_fp32_master_curve(trained):
    """optim.cpu_offload in bf16: the distributed optimizer's bf16 shards get fp32 masters on the host
    (no fp32 main copy beside the params), stepped by torch's AdamW there; megatron's fp32-master
    curve, and a resume from its checkpoint continues its own curve bit for bit."""
    _close(trained["offload"], trained["plain"], rtol=1e-4)
    assert trained["from_offload"] == trained["offload"][3:]
    # bf16 main grads (the grad buffer on the GPU, copied into fp32 on the host): the same curve
    _close(trained["offload_bf16_grads"], trained["plain"], rtol=1e-3)


@pytest.mark.parametrize("name", [x[0] for x in PARALLEL])
def test_parallel_layouts_train_the_fp32_master_curve(name, trained):
    """The precision-aware optimizer's params and states are DP shards of flattened buffers (and TP/PP
    slices): under torchrun with gloo each layout follows the single-process fp32-master curve."""
    _close(trained[name], trained["plain"], rtol=5e-3)
