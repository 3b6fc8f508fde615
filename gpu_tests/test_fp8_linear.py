"""train.precision=fp8 on the GPU (models/kernels/fp8_linear.py): the Triton cast against torch's
cast, the fp8 GEMMs against an fp32 matmul of independently quantized-and-dequantized operands,
and training the tiny model against the bf16 model (gpu_tests/test_cuda_graph.py runs it graphed).

    python -m pytest -q gpu_tests/test_fp8_linear.py
"""
from __future__ import annotations

import pytest
import torch

from models.kernels import fp8_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="needs a GPU with fp8 tensor cores")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("shape", [(8192, 2048), (200, 48), (64, 1000)])
def test_triton_cast_equals_torch_cast(dtype, shape):
    t = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 7
    t[3, 5] = 1000.0  # sets the amax: everything else far below it, some values underflow
    out, out_t, inverse = fp8_linear.cast_to_fp8(t, dtype, fp8_linear.amax(t), rowwise=True, colwise=True)
    scale = torch.finfo(dtype).max / t.float().abs().max()
    want = (t.float() * scale).to(dtype)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(out_t.view(torch.uint8), want.t().contiguous().view(torch.uint8))
    torch.testing.assert_close(inverse, 1 / scale)


def _dequantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fp8_max = torch.finfo(dtype).max
    scale = fp8_max / t.float().abs().max()
    return (t.float() * scale).clamp(-fp8_max, fp8_max).to(dtype).float() / scale


def test_gemms_match_dequantized_fp32_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(1024, 2, 2048, device="cuda", generator=g) * 3).bfloat16().requires_grad_()
    w = (torch.randn(4096, 2048, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    dy = (torch.randn(1024, 2, 4096, device="cuda", generator=g) * 1e-3).bfloat16()
    y = fp8_linear.fp8_linear(x, w)
    y.backward(dy)
    xq, wq = _dequantized(x.detach(), torch.float8_e4m3fn).reshape(-1, 2048), _dequantized(w.detach(), torch.float8_e4m3fn)
    dyq = _dequantized(dy, torch.float8_e5m2).reshape(-1, 4096)
    for got, want in ((y.reshape(-1, 4096), xq @ wq.t()), (x.grad.reshape(-1, 2048), dyq @ wq), (w.grad, dyq.t() @ xq)):
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def _steps(build_engine, fp8: bool, n: int = 4) -> list[float]:
    args, engine = build_engine("tiny", seed=3, seq_length=256, micro_batch_size=2, params_dtype=torch.bfloat16,
                                steps=n, fusion=True, fp8=fp8)
    g = torch.Generator().manual_seed(4)
    losses = []
    for _ in range(n):
        tokens = torch.randint(0, args.vocab_size, (2, 257), generator=g)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 256),
                 "position_ids": torch.arange(256).expand(2, 256).contiguous()}
        r = engine.train_step([batch])
        losses.append(float(r.loss_sum / r.num_tokens))
    return losses


def test_fp8_training_tracks_bf16(build_engine, monkeypatch):
    calls = []
    apply = fp8_linear._Fp8Linear.apply
    monkeypatch.setattr(fp8_linear._Fp8Linear, "apply", lambda *a: calls.append(1) or apply(*a))
    fp8 = _steps(build_engine, True)
    assert len(calls) == 4 * 4 * 4  # four linears, four layers, four steps
    bf16 = _steps(build_engine, False)
    assert len(calls) == 64
    assert fp8 != bf16
    assert fp8 == pytest.approx(bf16, rel=5e-3), (fp8, bf16)
