"""optim.precision_aware's update (parallel/fused_adam.py) against torch's AdamW over an fp32
master copy, and its stochastic rounding; whole runs are tests/dist/test_precision_aware.py. The
GPU's Triton kernel has the same checks in gpu_tests/test_fused_adam.py."""
from __future__ import annotations

import torch

from parallel.fused_adam import FusedAdam, join_master, split_master, stochastic_round


def test_remainders_hold_the_fp32_master_exactly():
    g = torch.Generator().manual_seed(0)
    master = torch.randn(200_000, generator=g) * torch.logspace(-8, 4, 200_000)
    high, low = split_master(master)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert torch.equal(join_master(high, low), master)
    # The bf16 half is the round-to-nearest bf16 of the master weight (ties may round either way).
    assert (high != master.bfloat16()).float().mean() < 1e-4
    assert ((high.float() - master).abs() <= (master.bfloat16().float() - master).abs()).all()


def _adamw_pair(moments: torch.dtype, steps: int = 8):
    """The same steps through FusedAdam (bf16 params, remainders, grad_scale) and torch AdamW on fp32."""
    g = torch.Generator().manual_seed(1)
    shapes = [(64, 48), (48,), (1000,)]
    masters = [torch.randn(s, generator=g) * 0.05 for s in shapes]
    params = [torch.nn.Parameter(m.bfloat16()) for m in masters]
    reference = [torch.nn.Parameter(p.detach().float()) for p in params]  # the master starts at the bf16 value
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    fused = FusedAdam([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
                      exp_avg_dtype=moments, exp_avg_sq_dtype=moments, **kw)
    torch_adamw = torch.optim.AdamW([{"params": reference[:2], "weight_decay": 0.1},
                                     {"params": reference[2:], "weight_decay": 0.0}], **kw)
    fused.grad_scale = torch.tensor(64.0)
    for _ in range(steps):
        for p, r in zip(params, reference):
            grad = torch.randn(p.shape, generator=g) * 64.0
            p.decoupled_grad, r.grad = grad, grad / 64.0
        fused.step()
        torch_adamw.step()
    return fused, params, torch_adamw, reference


def test_fused_adam_matches_torch_adamw_on_fp32_masters():
    fused, params, torch_adamw, reference = _adamw_pair(torch.float32)
    for p, r in zip(params, reference):
        master = fused.get_unscaled_state(p, "master_param")
        torch.testing.assert_close(master, r.detach(), rtol=1e-5, atol=1e-7)
        # the param is the master's bf16 rounding to nearest (a tie may round either way)
        assert ((p.detach().float() - master).abs() <= (master.bfloat16().float() - master).abs()).all()
        for key in ("exp_avg", "exp_avg_sq"):
            ref = torch_adamw.state[r][key]  # near-zero moments cancel: tolerance relative to their scale
            torch.testing.assert_close(fused.get_unscaled_state(p, key), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
        assert float(fused.state[p]["step"]) == 8


def test_bf16_moments_stay_within_bf16_tolerance():
    fused, params, _, reference = _adamw_pair(torch.bfloat16)
    for p, r in zip(params, reference):
        assert fused.state[p]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(fused.get_unscaled_state(p, "master_param"), r.detach(), rtol=1e-2, atol=1e-4)


def test_stochastic_round_picks_a_neighbour_with_probability_by_distance():
    g = torch.Generator().manual_seed(2)
    n = 1_000_000
    for value in (1.0 + 0.3 * 2**-7, -3.0 - 0.8 * 2**-6, 1e-6 * (1 + 0.5 * 2**-7)):
        x = torch.full((n,), value)
        down = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)  # truncation: toward zero
        up = ((x.view(torch.int32) & ~0xFFFF) + 0x10000).view(torch.float32)  # next bf16 away from zero
        noise = torch.randint(0, 1 << 16, (n,), generator=g, dtype=torch.int32)
        out = stochastic_round(x, noise).float()
        assert ((out == down) | (out == up)).all(), value
        p_up = float((x[0] - down[0]) / (up[0] - down[0]))
        sigma = abs(float(up[0] - down[0])) * (p_up * (1 - p_up) / n) ** 0.5
        assert abs(out.double().mean().item() - value) < 5 * sigma, value


def sub_ulp_adam(params: torch.Tensor, stochastic: bool, steps: int = 30) -> torch.Tensor:
    """params all 1.0 (bf16), a constant gradient: AdamW moves each by lr = 1e-4 a step, 1/39 of
    the bf16 spacing below 1.0; returns the params after `steps`."""
    fused = FusedAdam([params], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, stochastic_rounding=stochastic)
    params.decoupled_grad = torch.ones_like(params, dtype=torch.float32)
    for _ in range(steps):
        fused.step()
    return params.detach()


def test_stochastic_rounding_tracks_updates_below_a_bf16_ulp():
    """torch AdamW on fp32 moves 1.0 to 0.997; on bf16 params (rounding to nearest) not at all.
    Stochastic rounding's bf16 params average the fp32 value."""
    reference = torch.nn.Parameter(torch.ones(200_000))
    adamw = torch.optim.AdamW([reference], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    nearest = torch.nn.Parameter(torch.ones(200_000, dtype=torch.bfloat16))
    nearest_adamw = torch.optim.AdamW([nearest], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(30):
        reference.grad, nearest.grad = torch.ones_like(reference), torch.ones_like(nearest)
        adamw.step()
        nearest_adamw.step()
    expected = reference.detach().double().mean().item()
    assert abs(expected - (1 - 30e-4)) < 1e-5 and (nearest.detach() == 1.0).all()  # the contrast
    stochastic = sub_ulp_adam(torch.nn.Parameter(torch.ones(200_000, dtype=torch.bfloat16)), stochastic=True)
    moved = 1.0 - expected
    assert abs(stochastic.double().mean().item() - expected) < 0.02 * moved
    assert stochastic.unique().numel() > 1  # individual params land on neighbouring bf16 values
