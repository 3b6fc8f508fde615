"""parallel/fused_adam.py's Triton kernel on the GPU, against torch's AdamW over fp32 master
copies (the independent reference) and against its own torch-ops path (what CPU runs use);
its stochastic-rounding variant against the exact update; then a whole bf16 run with
optim.precision_aware against megatron's fp32-master optimizer."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from parallel.fused_adam import FusedAdam

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


def _steps(moments: torch.dtype, device: str, steps: int = 10, stochastic: bool = False):
    g = torch.Generator(device="cpu").manual_seed(1)
    shapes = [(1024, 1000), (4096,), (257, 33)]  # sizes off the kernel's block size
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).bfloat16().to(device)) for s in shapes]
    reference = [torch.nn.Parameter(p.detach().float()) for p in params]
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    fused = FusedAdam([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
                      exp_avg_dtype=moments, exp_avg_sq_dtype=moments, stochastic_rounding=stochastic, **kw)
    torch_adamw = torch.optim.AdamW([{"params": reference[:2], "weight_decay": 0.1},
                                     {"params": reference[2:], "weight_decay": 0.0}], **kw)
    fused.grad_scale = torch.tensor(512.0, device=device)
    for _ in range(steps):
        for p, r in zip(params, reference):
            grad = (torch.randn(p.shape, generator=g) * 512.0).to(device)
            p.decoupled_grad, r.grad = grad, grad / 512.0
        fused.step()
        torch_adamw.step()
    return fused, params, torch_adamw, reference


@pytest.mark.parametrize("moments,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_triton_adamw_matches_torch_adamw_on_fp32_masters(moments, tol):
    fused, params, torch_adamw, reference = _steps(moments, "cuda")
    for p, r in zip(params, reference):
        master = fused.get_unscaled_state(p, "master_param")
        # bf16 moments: within 1% of the distance the weights can move (lr x steps = 3e-2)
        torch.testing.assert_close(master, r.detach(), rtol=tol, atol=1e-7 if moments == torch.float32 else 3e-4)
        # the param is the master's bf16 rounding to nearest (a tie may round either way)
        assert ((p.detach().float() - master).abs() <= (master.bfloat16().float() - master).abs()).all()
        for key in ("exp_avg", "exp_avg_sq"):
            ref = torch_adamw.state[r][key]
            torch.testing.assert_close(fused.get_unscaled_state(p, key), ref, rtol=tol, atol=tol * ref.abs().max())


def test_triton_kernel_matches_the_torch_path():
    triton_run = _steps(torch.float32, "cuda")
    torch_run = _steps(torch.float32, "cpu")  # parallel/fused_adam._step_torch
    for p_gpu, p_cpu in zip(triton_run[1], torch_run[1]):
        torch.testing.assert_close(triton_run[0].get_unscaled_state(p_gpu, "master_param").cpu(),
                                   torch_run[0].get_unscaled_state(p_cpu, "master_param"), rtol=1e-5, atol=1e-8)


def test_triton_stochastic_kernel_matches_the_torch_path():
    """The same noise (parallel/fused_adam.rounding_noise) in both: the params agree but where the
    two paths' fp32 arithmetic differs in the last bit right at a rounding threshold (a few per
    million). Such a param stays one bf16 step (of the magnitude it had then) off afterwards."""
    triton_run = _steps(torch.float32, "cuda", stochastic=True)
    torch_run = _steps(torch.float32, "cpu", stochastic=True)
    for p_gpu, p_cpu in zip(triton_run[1], torch_run[1]):
        a, b = p_gpu.detach().cpu().float(), p_cpu.detach().float()
        assert (a != b).float().mean().item() < 1e-4
        torch.testing.assert_close(a, b, rtol=0, atol=2 ** -8 * b.abs().max().item())


def test_triton_stochastic_rounding_picks_a_neighbour_of_the_exact_update():
    """One step from the same state, remainders (exact fp32 master) vs stochastic rounding: every
    stochastic param is one of the two bf16 values around the exact master, up with probability
    by distance (the mean error over 4M params ~0)."""
    g = torch.Generator(device="cpu").manual_seed(3)
    start = (torch.randn(4_000_000, generator=g) * 0.05).bfloat16().cuda()
    grad = torch.randn(4_000_000, generator=g).cuda()
    out = {}
    for stochastic in (False, True):
        p = torch.nn.Parameter(start.clone())
        p.decoupled_grad = grad
        fused = FusedAdam([p], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, stochastic_rounding=stochastic)
        fused.step()
        out[stochastic] = fused.get_unscaled_state(p, "master_param")
    exact, rounded = out[False], out[True]
    down = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32)
    up = ((exact.view(torch.int32) & ~0xFFFF) + 0x10000).view(torch.float32)
    assert ((rounded == down) | (rounded == up)).all()
    err = (rounded - exact).double()
    spacing = (up - down).abs().double()
    assert abs(err.mean().item()) < 5 * (spacing.square().mean().item() / 4 / exact.numel()) ** 0.5
    p_up = ((exact - down) / (up - down)).mean().item()
    assert (rounded == up).float().mean().item() == pytest.approx(p_up, abs=2e-3)


def test_triton_stochastic_rounding_tracks_updates_below_a_bf16_ulp():
    """AdamW moves 1.0 by lr = 1e-4 a step (1/39 of bf16's spacing below 1.0): rounding to nearest
    never moves; stochastic rounding's mean follows torch's fp32 AdamW."""
    reference = torch.nn.Parameter(torch.ones(1_000_000, device="cuda"))
    adamw = torch.optim.AdamW([reference], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    params = torch.nn.Parameter(torch.ones(1_000_000, dtype=torch.bfloat16, device="cuda"))
    fused = FusedAdam([params], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, stochastic_rounding=True)
    params.decoupled_grad = torch.ones_like(params, dtype=torch.float32)
    for _ in range(30):
        reference.grad = torch.ones_like(reference)
        adamw.step()
        fused.step()
    expected = reference.detach().double().mean().item()
    assert abs(params.detach().double().mean().item() - expected) < 0.02 * (1.0 - expected)


def _train(tmp_path, name: str, *extra: str) -> list[dict]:
    run_dir = tmp_path / name
    cmd = [sys.executable, "-m", "launcher.train", "model=tiny", "device=cuda", "train.precision=bf16",
           "train.steps=8", "train.global_batch_size=8", "train.micro_batch_size=4",
           "logging.wandb.mode=disabled", "logging.progress=false", "checkpoint.final_save=false",
           f"run.dir={run_dir}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_precision_aware_run_matches_fp32_master_run(tmp_path):
    reference = _train(tmp_path, "plain")
    for name, extra in (("fp32", ()), ("bf16", ()), ("bf16", ("optim.master_weights=stochastic",))):
        run = _train(tmp_path, name + ("_stochastic" if extra else ""), "optim.precision_aware=true",
                     f"optim.moments_dtype={name}", *extra)
        assert [r["step"] for r in run] == [r["step"] for r in reference]
        for a, b in zip(reference, run):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (name, extra, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2), (name, extra, a["step"])
        assert run[-1]["peak_mem_gb"] < reference[-1]["peak_mem_gb"]
