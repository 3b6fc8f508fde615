"""models/kernels/norm.py: the Triton RMSNorm forward and backward (dx and the weight gradient)
against autograd through torch's F.rms_norm computed in fp32 (fp32 1e-5, bf16 1e-2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.kernels.norm import rms_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the GPU machine)")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4096, 2, 2048), (37, 3, 1000), (256, 2, 16, 128)], ids=["bench", "ragged", "qk"])
def test_rms_norm_matches_f_rms_norm(dtype, tol, shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(*shape, device="cuda", generator=g) * 2 + 0.3).to(dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=g)).to(dtype).requires_grad_(True)
    dy = torch.randn(*shape, device="cuda", generator=g).to(dtype)
    y = rms_norm(x, w, 1e-5)
    y.backward(dy)
    x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    y32 = F.rms_norm(x32, (shape[-1],), w32, 1e-5)
    y32.backward(dy.float())
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == dtype
    torch.testing.assert_close(y.float(), y32, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=tol, atol=tol)
    # the weight gradient sums over every row: compare relative to its scale
    torch.testing.assert_close(w.grad.float(), w32.grad, rtol=tol, atol=tol * w32.grad.abs().max().item())
