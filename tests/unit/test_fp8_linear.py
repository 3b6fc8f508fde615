"""train.precision=fp8 (models/kernels/fp8_linear.py) on CPU, where the fp8 GEMMs run as fp32
matmuls of the fp8 operands (checked against torch's own `_scaled_mm`): each GEMM against an fp32 matmul of independently quantized-and-dequantized operands
(one scale per tensor from its amax). A whole fp8 run against the bf16 run is in
tests/dist/test_fp8_training.py; the Triton cast kernel is checked by
tests/scripts/triton_kernels_interpreted.py and on the GPU by gpu_tests/test_fp8_linear.py."""
from __future__ import annotations

import pytest
import torch

from models.kernels import fp8_linear


def _dequantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as the fp8 GEMM sees it: scaled so its amax lands on the format's largest value, rounded."""
    fp8_max = torch.finfo(dtype).max
    scale = fp8_max / t.float().abs().max()
    return (t.float() * scale).clamp(-fp8_max, fp8_max).to(dtype).float() / scale


def _operands(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 5, 64, generator=g) * 3).bfloat16()  # [s, b, k] as megatron's linears get it
    w = (torch.randn(48, 64, generator=g) * 0.02).bfloat16()
    dy = (torch.randn(3, 5, 48, generator=g) * 1e-3).bfloat16()
    return x, w, dy


def _close(got: torch.Tensor, want: torch.Tensor) -> None:  # bf16 outputs: 1e-2 of the largest value
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_gemms_match_dequantized_fp32_reference():
    x, w, dy = _operands()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear.fp8_linear(xr, wr)
    y.backward(dy)
    xq, wq = _dequantized(x, torch.float8_e4m3fn), _dequantized(w, torch.float8_e4m3fn)
    dyq = _dequantized(dy, torch.float8_e5m2).reshape(-1, 48)
    _close(y, xq @ wq.t())
    _close(xr.grad, (dyq @ wq).reshape(x.shape))
    _close(wr.grad, dyq.t() @ xq.reshape(-1, 64))
    # and fp8 is a close approximation of the bf16 linear itself (a few % relative error)
    exact = x.float() @ w.float().t()
    assert (y.float() - exact).norm() / exact.norm() < 0.05


@pytest.mark.parametrize("main_grad_dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_is_added_into_main_grad(main_grad_dtype):
    """megatron's gradient_accumulation_fusion contract: the weight gradient goes into main_grad
    (accumulating over micro batches) and autograd gets a placeholder DDP's hook recognizes."""
    x, w, dy = _operands(1)
    wr = w.clone().requires_grad_()
    start = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)).to(main_grad_dtype)
    wr.main_grad, wr.grad_added_to_main_grad = start.clone(), False
    fp8_linear.fp8_linear(x.clone().requires_grad_(), wr, gradient_accumulation_fusion=True).backward(dy)
    want = start.float() + _dequantized(dy, torch.float8_e5m2).reshape(-1, 48).t() @ \
        _dequantized(x, torch.float8_e4m3fn).reshape(-1, 64)
    torch.testing.assert_close(wr.main_grad.float(), want, rtol=1e-2, atol=1e-2)
    assert wr.grad_added_to_main_grad is True and wr.grad is not None and wr.grad.shape == w.shape


def _saved_by_forward(x: torch.Tensor, w: torch.Tensor, keep_input: bool) -> list[torch.Tensor]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fp8_linear.fp8_linear(x, w, keep_input=keep_input)
    return [t for t in saved if t.numel() > 1]  # (the scales)


def test_backward_holds_an_fp8_input_and_the_weight_itself():
    """What the linear holds for backward: x as its fp8 transpose (half the bf16 bytes), or with
    keep_input x's own storage; the weight is the parameter itself, never an fp8 copy."""
    x, w, _ = _operands()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    held = _saved_by_forward(xr, wr, keep_input=False)
    assert [(t.dtype, tuple(t.shape)) for t in held if t is not wr] == [(torch.float8_e4m3fn, (64, 15))]
    assert any(t is wr for t in held)
    held = _saved_by_forward(xr, wr, keep_input=True)
    assert {t.dtype for t in held} == {torch.bfloat16}
    assert sorted(t.untyped_storage().data_ptr() for t in held) == sorted(
        [xr.untyped_storage().data_ptr(), wr.untyped_storage().data_ptr()])


def test_keep_input_reads_the_input_refilled_before_backward():
    """A recompute frees the input after forward and refills it before backward (models/norm_recompute.py,
    models/mlp_act_recompute.py): the gradients are those of the linear that never let go of it."""
    x, w, dy = _operands(3)
    grads = []
    for free in (False, True):
        a, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        h = a * 1  # a non-leaf activation, as a norm output is
        y = fp8_linear.fp8_linear(h, wr, keep_input=free)
        if free:
            kept, nbytes = h.detach().clone(), h.untyped_storage().nbytes()
            h.untyped_storage().resize_(0)

            def refill(grad, kept=kept, h=h, nbytes=nbytes):
                h.untyped_storage().resize_(nbytes)
                h.untyped_storage().copy_(kept.untyped_storage())

            y.register_hook(refill)
        y.backward(dy)
        grads.append((a.grad, wr.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[1][1].abs().sum() > 0


def test_zero_input_gives_zero_output():
    w = torch.randn(32, 16).bfloat16()
    assert torch.equal(fp8_linear.fp8_linear(torch.zeros(4, 16, dtype=torch.bfloat16), w),
                       torch.zeros(4, 32, dtype=torch.bfloat16))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_cpu_gemm_equals_torch_scaled_mm(out_dtype):
    """The CPU fp8 GEMM (fp32 matmul of the widened operands) is torch's `_scaled_mm`, on shapes
    small enough for torch's slow CPU kernel: row-major a, column-major b, per-tensor scales."""
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(32, 64, generator=g) * 40).to(torch.float8_e4m3fn)
    b = (torch.randn(48, 64, generator=g) * 40).to(torch.float8_e5m2).t()
    scale_a, scale_b = torch.tensor(0.37), torch.tensor(1.9)
    want = torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=out_dtype)
    got = fp8_linear.scaled_mm(a, b, scale_a, scale_b, out_dtype=out_dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    # (fp32 accumulation in another order; bf16 outputs then round to the same value or a neighbour)
    tol = 1e-5 if out_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())
