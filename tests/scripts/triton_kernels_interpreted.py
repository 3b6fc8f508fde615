"""The Triton kernels of the torch backend, run on CPU by Triton's interpreter (TRITON_INTERPRET=1,
set by tests/dist/test_triton_kernels.py before triton is imported), against independent references:
torch's AdamW over an fp32 master copy, autograd through silu(gate) * up, torch's F.rms_norm and
megatron's unfused RoPE. fp32 within 1e-5; bf16 inputs within 1e-2. The same kernels run
compiled on the GPU in gpu_tests/."""
from __future__ import annotations

import gc
import math
import os
import types

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/dist/test_triton_kernels.py"

from models.kernels import fp8_linear, moe_permute, norm, rope, swiglu  # noqa: E402
from parallel import fused_adam  # noqa: E402


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
    print(f"{name}: max |diff| {(got.float() - want.float()).abs().max().item():.3g}")


def adamw() -> None:
    g = torch.Generator().manual_seed(0)
    n, lr, betas, eps, wd, scale = 3000, 3e-3, (0.9, 0.95), 1e-8, 0.1, 16.0
    start = torch.randn(n, generator=g) * 0.05
    param, remainder = fused_adam.split_master(start)  # the fp32 master, exactly, as bf16 + remainder
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    reference = torch.nn.Parameter(start.clone())
    torch_adamw = torch.optim.AdamW([reference], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for step in range(1, 6):
        grad = torch.randn(n, generator=g) * scale
        reference.grad = grad / scale
        torch_adamw.step()
        fused_adam._adamw_kernel[(triton_cdiv(n, 1024),)](
            param, remainder, grad, exp_avg, exp_avg_sq, torch.tensor(scale), n, 0, lr, betas[0], betas[1], eps, wd,
            1 - betas[0] ** step, math.sqrt(1 - betas[1] ** step), STOCHASTIC=False, HAS_SCALE=True, BLOCK=1024)
    master = fused_adam.join_master(param, remainder)
    check("adamw master", master, reference.detach(), 1e-5)
    check("adamw exp_avg_sq", exp_avg_sq, torch_adamw.state[reference]["exp_avg_sq"], 1e-5)
    assert torch.equal(param, master.bfloat16()) or \
        ((param.float() - master).abs() <= (master.bfloat16().float() - master).abs()).all()


def adamw_stochastic() -> None:
    """The stochastic-rounding kernel against the torch path with the same noise (rounding_noise):
    the same params but where the two fp32 computations differ right at a rounding threshold."""
    g = torch.Generator().manual_seed(5)
    n, lr, betas, eps, wd, scale, seed = 5000, 3e-3, (0.9, 0.95), 1e-8, 0.1, 16.0, 123457
    start = (torch.randn(n, generator=g) * 0.05).bfloat16()
    states = {name: (start.clone(), torch.zeros(n), torch.zeros(n)) for name in ("triton", "torch")}
    for step in range(1, 6):
        grad = torch.randn(n, generator=g) * scale
        args = (lr, betas[0], betas[1], eps, wd, 1 - betas[0] ** step, math.sqrt(1 - betas[1] ** step))
        p, m, v = states["triton"]
        fused_adam._adamw_kernel[(triton_cdiv(n, 1024),)](
            p, p, grad, m, v, torch.tensor(scale), n, seed + step, *args, STOCHASTIC=True, HAS_SCALE=True, BLOCK=1024)
        p, m, v = states["torch"]
        fused_adam._step_torch(p, None, grad, m, v, torch.tensor(scale), *args, seed=seed + step)
    got, want = states["triton"][0], states["torch"][0]
    differ = (got != want).float().mean().item()
    assert differ < 1e-3, differ
    assert not torch.equal(got, start)
    print(f"adamw stochastic: {differ:.2%} of params differ from the torch path")


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def swiglu_back() -> None:
    g = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        y = (torch.randn(5, 3, 2 * 96, generator=g) * 3).to(dtype)
        grad = torch.randn(5, 3, 96, generator=g).to(dtype)
        y32 = y.float().requires_grad_(True)
        gate, up = torch.chunk(y32, 2, -1)
        (F.silu(gate) * up).backward(grad.float())
        check(f"swiglu backward {dtype}", swiglu.swiglu_back(grad, y), y32.grad, tol)
        out = torch.full((5, 3, 96), float("nan"), dtype=dtype)
        swiglu._swiglu_kernel_into(y, out)
        check(f"swiglu forward into a tensor {dtype}", out, (F.silu(gate) * up).detach(), tol)


def rms_norm() -> None:
    g = torch.Generator().manual_seed(2)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = (torch.randn(13, 3, 80, generator=g) * 2 + 0.3).to(dtype).requires_grad_(True)
        w = (1 + 0.1 * torch.randn(80, generator=g)).to(dtype).requires_grad_(True)
        dy = torch.randn(13, 3, 80, generator=g).to(dtype)
        y = norm._TritonRMSNorm.apply(x, w, 1e-5)
        y.backward(dy)
        x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
        F.rms_norm(x32, (80,), w32, 1e-5).backward(dy.float())
        check(f"rms_norm forward {dtype}", y, F.rms_norm(x32.detach(), (80,), w32.detach(), 1e-5), tol)
        check(f"rms_norm dx {dtype}", x.grad, x32.grad, tol)
        check(f"rms_norm dweight {dtype}", w.grad, w32.grad, tol)
        out = torch.full((39, 80), float("nan"), dtype=dtype)
        norm.rms_norm_forward_into(x.detach().reshape(39, 80), w.detach(), 1e-5, out)
        check(f"rms_norm forward into a tensor {dtype}", out, F.rms_norm(x32.detach(), (80,), w32.detach(), 1e-5).reshape(39, 80), tol)

        # the residual add fused in: both outputs used, as in a layer (the sum feeds the next add)
        r = torch.randn(13, 3, 80, generator=g).to(dtype).requires_grad_(True)
        x.grad = w.grad = None
        d_total = torch.randn(13, 3, 80, generator=g).to(dtype)
        total, y = norm._TritonAddRMSNorm.apply(x, r, w, 1e-5)
        torch.autograd.backward([total, y], [d_total, dy])
        r32 = r.detach().float().requires_grad_(True)
        x32.grad = w32.grad = None
        total32 = x32 + r32
        torch.autograd.backward([total32, F.rms_norm(total32, (80,), w32, 1e-5)], [d_total.float(), dy.float()])
        check(f"add_rms_norm sum {dtype}", total, total32, tol)
        check(f"add_rms_norm forward {dtype}", y, F.rms_norm(total32.detach(), (80,), w32.detach(), 1e-5), tol)
        check(f"add_rms_norm dx {dtype}", x.grad, x32.grad, tol)
        check(f"add_rms_norm dresidual {dtype}", r.grad, r32.grad, tol)
        check(f"add_rms_norm dweight {dtype}", w.grad, w32.grad, tol)


def add_norm_forward_leaves_no_graph() -> None:
    """A fused residual add + norm whose backward never runs leaves nothing behind once its outputs
    go: megatron runs the bias-dropout-add under enable_grad even in no_grad passes (DPO's reference
    pass, evaluation), so its node is built there with the norm weight requiring grad. A node that
    saved a view of its own output would form a reference cycle Python's gc cannot collect."""
    def alive() -> int:
        gc.collect()
        return sum(type(o).__name__ == "_TritonAddRMSNormBackward" for o in gc.get_objects())

    before = alive()
    w = torch.ones(64, requires_grad=True)
    with torch.no_grad():
        for _ in range(3):
            x, r = torch.randn(8, 2, 64), torch.randn(8, 2, 64)
            with torch.enable_grad():
                total, y = norm._TritonAddRMSNorm.apply(x, r, w, 1e-5)
            assert total.grad_fn is not None  # (the case: a node was built)
            del total, y
    assert alive() == before, f"{alive() - before} fused add-norm nodes outlived their outputs"
    print("add_rms_norm: no node outlives its outputs")


def rope_on_strided_key() -> None:
    torch.manual_seed(3)
    s, b, groups, d = 21, 2, 3, 64
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(s).float(), inv)
    freqs = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    qkv = torch.randn(s, b, groups, 4 * d, requires_grad=True)
    key = qkv[..., 2 * d:3 * d]  # a view into the fused projection, as megatron hands k over
    out = rope._TritonRope.apply(key, rope._cos_sin_table(freqs, 0.9))
    key32 = key.detach().clone().requires_grad_(True)
    ref = rope.unfused_rope_bshd(key32, freqs, mscale=0.9)
    grad = torch.randn(s, b, groups, d)
    (g_out,) = torch.autograd.grad(out, qkv, grad)
    (g_ref,) = torch.autograd.grad(ref, key32, grad)
    check("rope forward", out, ref, 1e-5)
    check("rope backward", g_out[..., 2 * d:3 * d], g_ref, 1e-5)
    assert g_out[..., :2 * d].abs().max() == 0 and g_out[..., 3 * d:].abs().max() == 0


def rope_packed() -> None:
    """Packed rows (THD, three documents) against megatron's unfused THD path, which splits the
    rows per document and rotates each from position 0; and with a freqs row per token."""
    torch.manual_seed(6)
    heads, d, cu = 3, 32, torch.tensor([0, 5, 6, 17], dtype=torch.int32)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    group = types.SimpleNamespace(size=lambda: 1, rank=lambda: 0)  # megatron reads only these of its cp group
    for max_s in (11, 17):  # 17 = one row per token: megatron's exact-offset mapping
        freqs = torch.outer(torch.arange(max_s).float(), inv)
        freqs = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
        qkv = torch.randn(17, heads, 3 * d, requires_grad=True)
        query = qkv[..., :d]  # a view into the fused projection, as megatron hands q over
        rope._last_thd_table = None
        out = rope._TritonRope.apply(query.unsqueeze(1), rope._thd_cos_sin_table(freqs, cu, 17, 0.8)).squeeze(1)
        q32 = query.detach().clone().requires_grad_(True)
        ref = rope.unfused_rope_thd(q32, cu, freqs, mscale=0.8, cp_group=group)
        grad = torch.randn(17, heads, d)
        (g_out,) = torch.autograd.grad(out, qkv, grad)
        (g_ref,) = torch.autograd.grad(ref, q32, grad)
        check(f"packed rope forward, freqs rows {max_s}", out, ref, 1e-5)
        check(f"packed rope backward, freqs rows {max_s}", g_out[..., :d], g_ref, 1e-5)


def qkv_rope() -> None:
    """The one-pass qkv kernel against megatron's split path (torch.split of the fused projection,
    query heads out of their groups, the unfused RoPE on q and k, v untouched), forward and the
    qkv gradient; 3 groups of 2 query heads, a batch whose rows are padded in the projection."""
    torch.manual_seed(4)
    s, b, groups, per_group, d = 13, 2, 3, 2, 64
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(s).float(), inv)
    freqs = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    width = (per_group + 2) * d
    padded = torch.randn(s, b + 1, groups * width)  # qkv's (s, b) strides differ from a packed tensor's
    qkv = padded[:, :b].view(s, b, groups, width).requires_grad_(True)
    out = rope._TritonQkvRope.apply(qkv, freqs, per_group)
    qkv32 = qkv.detach().clone().requires_grad_(True)
    q, k, v = torch.split(qkv32, [per_group * d, d, d], dim=3)
    ref = (rope.unfused_rope_bshd(q.reshape(s, b, groups * per_group, d), freqs), rope.unfused_rope_bshd(k, freqs), v)
    grads = [torch.randn_like(t) for t in ref]
    grads[0] = grads[0].transpose(0, 1).contiguous().transpose(0, 1)  # a strided query gradient, as SDPA may hand it
    (g_out,) = torch.autograd.grad(out, qkv, grads)
    (g_ref,) = torch.autograd.grad(ref, qkv32, grads)
    for name, got, want in zip("qkv", out, ref):
        check(f"qkv rope forward {name}", got, want, 1e-5)
        assert got.is_contiguous()
    check("qkv rope backward", g_out, g_ref, 1e-5)


def fp8_cast() -> None:
    """The fp8 cast kernel (scale, both layouts, ragged edges) on inputs whose scaled values are
    exact fp8 values: the interpreter's own fp32 -> fp8 rounding is wrong near powers of two
    (124 -> 64 in e4m3), so rounding is left to gpu_tests/test_fp8_linear.py, which asserts the
    bits against torch's cast on the GPU."""
    g = torch.Generator().manual_seed(7)
    for dtype, shift in ((torch.float8_e4m3fn, 2.0 ** -4), (torch.float8_e5m2, 2.0 ** -12)):
        fp8_max = torch.finfo(dtype).max
        q = (torch.randn(100, 72, generator=g) * fp8_max / 4).clamp(-fp8_max, fp8_max).to(dtype)
        q[5, 70] = fp8_max  # the amax: scale = 1 / shift exactly
        t = (q.float() * shift).bfloat16()
        out, out_t = torch.empty(100, 72, dtype=dtype), torch.empty(72, 100, dtype=dtype)
        inverse = torch.empty((), dtype=torch.float32)
        fp8_linear._cast_kernel[(2, 2)](t, t.abs().max(), inverse, out, out_t, 100, 72, FP8_MAX=fp8_max,
                                         AMAX_FLOOR=1e-12, ROWWISE=True, COLWISE=True, BR=64, BC=64)
        check(f"fp8 cast {dtype}", out.float(), q.float(), 0.0)
        check(f"fp8 cast transposed {dtype}", out_t.float(), q.float().t(), 0.0)
        check(f"fp8 dequantizing scale {dtype}", inverse, torch.tensor(shift, dtype=torch.float32), 0.0)

def moe_permute_combine() -> None:
    """The MoE permute/combine kernels against their torch paths (rows routed to 3 of 6 experts,
    a hidden size that is not a multiple of the block), bf16 rows and fp32 router weights."""
    g = torch.Generator().manual_seed(6)
    tokens, experts, k, hidden = 19, 6, 3, 1100
    logits = torch.randn(tokens, experts, generator=g)
    top = logits.topk(k, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, top, True)
    probs = torch.zeros(tokens, experts).scatter(1, top, torch.rand(tokens, k, generator=g))
    routing = moe_permute.Routing.from_map(probs, routing_map, k)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    y = torch.randn(tokens * k, hidden, generator=g).bfloat16()
    for name, fn, args in (("scatter", moe_permute.scatter_rows, (x, routing.pos, None)),
                           ("scatter weighted", moe_permute.scatter_rows, (x, routing.pos, routing.weights)),
                           ("gather sum", moe_permute.gather_sum, (y, routing.pos, None)),
                           ("gather sum weighted", moe_permute.gather_sum, (y, routing.pos, routing.weights)),
                           ("gather dot", moe_permute.gather_dot, (y, routing.pos, x))):
        check(f"moe {name}", fn(*args, use_triton=True), fn(*args, use_triton=False), 1e-2)


if __name__ == "__main__":
    adamw()
    adamw_stochastic()
    swiglu_back()
    rms_norm()
    add_norm_forward_leaves_no_graph()
    rope_on_strided_key()
    rope_packed()
    qkv_rope()
    moe_permute_combine()
    fp8_cast()
    print("TRITON KERNELS OK")
