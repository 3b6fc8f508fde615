"""parallel/compat: each patch's upstream failure reproduced on the unpatched megatron-core / torch,
then removed by the patch. The day a reproduction stops failing, upstream has fixed the bug and
the patch can go. Also the version gate and that cpu_emulation puts every original back."""
from __future__ import annotations

import importlib
import sys
import threading
import types
import warnings

import megatron.core
import numpy as np
import pytest
import torch
import torch.distributed as dist

from parallel import compat
from parallel.compat import cpu_emulation, fixes, standins
from parallel.compat import emulation
from parallel.compat.patching import Patches

NOT_COMPILED = "Torch not compiled with CUDA enabled"


@pytest.fixture
def upstream():
    """megatron-core as installed: process-wide fixes (if another test applied them) taken off
    for this test and put back after it."""
    applied = fixes._patches
    if applied is not None:
        applied.restore()
        fixes._patches = None
    yield
    if applied is not None:
        fixes.apply_fixes()


@pytest.fixture
def patches():
    """A fix applied for one test only (fix(patches)), restored after it."""
    p = Patches()
    yield p
    p.restore()


@pytest.fixture
def world_of_one():
    """gloo world of one with megatron's model-parallel state, under CPU emulation."""
    from megatron.core import parallel_state as ps

    with cpu_emulation():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        ps.initialize_model_parallel()
        try:
            yield
        finally:
            ps.destroy_model_parallel()
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# version gate


def test_unverified_megatron_version_is_one_line(upstream, monkeypatch):  # monkeypatch undone first
    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    for entry in (compat.check_megatron_version, compat.apply_fixes, lambda: cpu_emulation().__enter__(),
                  lambda: standins.te_fused_adam(torch.optim.AdamW).__enter__()):
        with pytest.raises(compat.UnverifiedMegatronVersion) as err:
            entry()
        message = str(err.value)
        assert "\n" not in message and "0.99.0" in message and all(v in message for v in compat.VERIFIED)
    assert fixes._patches is None and not emulation.active()  # nothing was patched


def test_installed_megatron_is_verified():
    compat.check_megatron_version()


# ---------------------------------------------------------------------------------------------
# megatron-core's import-time torch.compile, deferred to first call


def _fresh_jit(finder=None) -> types.ModuleType:
    """megatron.core.jit imported again (through `finder` when given), the process's own put back."""
    own = sys.modules.pop("megatron.core.jit")
    if finder is not None:
        sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("megatron.core.jit")
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        sys.modules["megatron.core.jit"] = own
        megatron.core.jit = own


def test_megatron_fusions_compile_at_first_call():
    from models.kernels.deferred_compile import deferred_compile
    from parallel.compat import deferred_compile as hook

    # Upstream: every @jit_fuser function goes through torch.compile where it is defined, at import.
    assert _fresh_jit().jit_fuser is torch.compile
    # With the hook in place when megatron-core is first imported: compiled at first call instead.
    assert _fresh_jit(hook._FindJit()).jit_fuser is deferred_compile
    hook.defer_megatron_compile()  # megatron-core is already imported here: nothing to arrange
    assert not any(isinstance(f, hook._FindJit) for f in sys.meta_path)


def test_deferred_compile_compiles_once_at_first_call_and_inlines_under_compile():
    from models.kernels.deferred_compile import deferred_compile

    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    def gelu_ish(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)

    fused = deferred_compile(backend=backend)(gelu_ish)
    assert graphs == [] and fused.__name__ == "gelu_ish"  # nothing traced before the first call
    x = torch.randn(8, 16)
    torch.testing.assert_close(fused(x), gelu_ish(x), rtol=0, atol=0)
    fused(x)
    assert len(graphs) == 1
    # Under an enclosing compile the function is traced into the enclosing graph, not compiled apart.
    outer = torch.compile(lambda t: fused(t) + 1, backend=backend)
    torch.testing.assert_close(outer(x), gelu_ish(x) + 1, rtol=0, atol=0)
    assert len(graphs) == 2 and "sigmoid" in str(graphs[1].code)


# ---------------------------------------------------------------------------------------------
# device-independent fixes


def test_fully_reshardable_load_without_step(upstream, patches):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    main = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.AdamW([main])
    main.grad = torch.ones(4)
    optimizer.step()  # state: step, exp_avg, exp_avg_sq
    owner = types.SimpleNamespace(config=types.SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False),
                                  model_param_group_index_map={"w": (0, 0)}, optimizer=optimizer)
    loaded = {"param": torch.full((4,), 2.0), "exp_avg": torch.full((4,), 3.0), "exp_avg_sq": torch.full((4,), 4.0)}
    with torch.no_grad(), pytest.raises(KeyError, match="step"):  # (megatron loads under no_grad)
        DistributedOptimizer._set_main_param_and_optimizer_states(owner, "w", loaded)

    fixes.fully_reshardable_load_skips_step(patches)
    step = optimizer.state[main]["step"].clone()
    with torch.no_grad():
        DistributedOptimizer._set_main_param_and_optimizer_states(owner, "w", loaded)
    state = optimizer.state[main]
    assert torch.equal(main.detach(), loaded["param"]) and torch.equal(state["exp_avg"], loaded["exp_avg"])
    assert torch.equal(state["exp_avg_sq"], loaded["exp_avg_sq"]) and torch.equal(state["step"], step)


def test_moe_aux_loss_scale_follows_sequence_parallel_tp_and_cp(upstream, patches):
    # The routers scale the aux loss by the tokens this rank routed (1/tp of them under sequence
    # parallel, 1/cp under context parallelism; the multi-rank consequence is checked by
    # tests/dist/test_moe.py's ep2_tp2 and cp2_ep2 cases).
    import inspect

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.moe.router import TopKRouter

    assert "activation.shape[0]" in inspect.getsource(TopKRouter.attach_and_log_load_balancing_loss)

    def aux_grad() -> float:
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
        aux = torch.tensor(1.0, requires_grad=True)
        MoEAuxLossAutoScaler.apply(torch.ones(2, requires_grad=True), aux).sum().backward()
        return float(aux.grad)

    assert aux_grad() == 1.0
    fixes.moe_aux_loss_scale_under_sequence_parallel(patches)
    config = types.SimpleNamespace(sequence_parallel=True, calculate_per_token_loss=True, tensor_model_parallel_size=2,
                                   context_parallel_size=1)
    try:
        fixes.set_moe_aux_loss_factor(config)
        assert aux_grad() == 2.0
        fixes.set_moe_aux_loss_factor(types.SimpleNamespace(**{**vars(config), "sequence_parallel": False}))
        assert aux_grad() == 1.0
        fixes.set_moe_aux_loss_factor(types.SimpleNamespace(**{**vars(config), "context_parallel_size": 2}))
        assert aux_grad() == 4.0
        fixes.set_moe_aux_loss_factor(config, scale=0.25)  # a loss normalised by another count (pairs)
        assert aux_grad() == 0.5
    finally:
        fixes._moe_aux_loss_factor = 1.0
        MoEAuxLossAutoScaler.main_loss_backward_scale = None


def test_fp32_router_gemm_without_te(upstream, patches):
    from megatron.core.transformer.moe import moe_utils

    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(NameError, match="te_general_gemm"):
        moe_utils.router_gating_linear(x, w, None, torch.float32)
    fixes.router_gemm_without_te(patches)
    torch.testing.assert_close(moe_utils.router_gating_linear(x, w, None, torch.float32), x @ w.t())


class _CountCalls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_grad_norm_and_scale_without_a_pass_per_grad(upstream, patches):
    from megatron.core.optimizer import clip_grads

    buffer = torch.randn(1000, dtype=torch.float32)
    grads = [buffer[i * 100:(i + 1) * 100] for i in range(10)]  # views of one grad buffer, as DDP's
    reference = torch.linalg.vector_norm(buffer.double()).item()

    with cpu_emulation(), _CountCalls() as calls:  # (upstream answers on device="cuda")
        upstream_norm, _ = clip_grads.l2_norm_impl(0, None, [grads], False)
    assert calls.names.count("norm") == len(grads) + 1  # one norm per grad, read back on the host
    assert upstream_norm.item() == pytest.approx(reference, rel=1e-6)
    with _CountCalls() as calls:
        clip_grads.multi_tensor_scale_impl(0, None, [grads, grads], 0.5)
    assert len(calls.names) >= 2 * len(grads)  # a multiply and a copy per tensor

    fixes.foreach_grad_norm_and_scale(patches)
    with _CountCalls() as calls:
        norm, _ = clip_grads.l2_norm_impl(0, None, [grads], False)
    assert "norm" not in calls.names and calls.names.count("linalg_vector_norm") == 2  # the buffer, the total
    assert norm.item() == pytest.approx(reference * 0.5, rel=1e-7)  # (halved by the upstream scale above)
    before = buffer.clone()
    with _CountCalls() as calls:
        clip_grads.multi_tensor_scale_impl(0, None, [grads, grads], 0.5)
    assert calls.names == ["_foreach_mul_"] and torch.equal(buffer, before * 0.5)


def test_output_discarding_recompute_without_fp8(upstream, patches):
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    x = torch.ones(3, requires_grad=True)
    with cpu_emulation():
        with pytest.raises(NameError, match="FP8GlobalStateManager"):
            CheckpointWithoutOutput().checkpoint(lambda t: t * 2, x)
        fixes.output_discarding_recompute_without_fp8(patches)
        assert torch.equal(CheckpointWithoutOutput().checkpoint(lambda t: t * 2, x), x * 2)
        assert CheckpointWithoutOutput(fp8="recipe").fp8 is True


def test_default_tp_group_without_a_warning(upstream, patches, world_of_one):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import layers

    with pytest.warns(DeprecationWarning, match="tp_group is None"):
        layers.get_tensor_model_parallel_group_if_none(None)
    fixes.tp_group_default_without_warning(patches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layers.get_tensor_model_parallel_group_if_none(None) is ps.get_tensor_model_parallel_group()
        assert layers.get_tensor_model_parallel_group_if_none(None, is_expert=True) \
            is ps.get_expert_tensor_parallel_group()


# ---------------------------------------------------------------------------------------------
# apex / TE stand-ins


def test_weight_gradient_fusion_without_apex(monkeypatch, world_of_one):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    monkeypatch.delattr(layers, "fused_weight_gradient_mlp_cuda", raising=False)
    config = ModelParallelConfig(gradient_accumulation_fusion=True, perform_initialization=False)
    build = lambda: layers.ColumnParallelLinear(8, 4, config=config, init_method=torch.nn.init.zeros_, bias=False)
    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda module is not found"):
        build()
    accum_fp32, accum_fp16 = (lambda *a: None), (lambda *a: None)
    compat.provide_fused_weight_gradient(accum_fp32, accum_fp16)
    build()
    assert layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32 is accum_fp32
    assert layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16 is accum_fp16


class _Built(Exception):
    pass


def test_precision_aware_optimizer_without_te():
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import OptimizerConfig, _get_megatron_optimizer_based_on_param_groups

    from parallel.fused_adam import precision_aware

    config = precision_aware(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16,
                                             use_distributed_optimizer=True), torch.bfloat16)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]}]
    with pytest.raises(TypeError, match="'>=' not supported between instances of 'NoneType' and 'Version'"):
        _get_megatron_optimizer_based_on_param_groups(config, [], groups)

    built = {}

    def adam(**kwargs):
        built.update(kwargs)
        raise _Built

    before = {name: getattr(mcore_optimizer, name) for name in ("Adam", "USING_PYTORCH_OPTIMIZER", "is_te_min_version")}
    with standins.te_fused_adam(adam), pytest.raises(_Built):
        _get_megatron_optimizer_based_on_param_groups(config, [], groups)
    assert built["exp_avg_dtype"] == torch.bfloat16 and built["master_weights"] and built["adam_w_mode"]
    assert "store_param_remainders" not in built  # TE's version check: no TE
    assert all(getattr(mcore_optimizer, name) is value for name, value in before.items())


def _hybrid_optimizer(params):
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    return HybridDeviceOptimizer(params, offload_fraction=1.0, cpu_optimizer_cls=torch.optim.AdamW,
                                 gpu_optimizer_cls=torch.optim.AdamW, param_update_in_fp32=True, lr=0.1)


def test_offloaded_fp32_shards_are_leaves(upstream, patches):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from parallel.megatron_engine import host_optimizer

    param = torch.nn.Parameter(torch.arange(6.0))
    config = host_optimizer(OptimizerConfig(lr=0.1, use_distributed_optimizer=True))

    def shard_groups():
        ranges = [{"params": [param], "orig_group": {"params": []}}]
        gbuf = [{torch.float32: [{"param_map": {param: {"param": types.SimpleNamespace(start=1, end=5)}}}]}]
        groups = DistributedOptimizer._build_model_and_main_param_groups(gbuf, {param: (0, torch.float32, 0)},
                                                                         ranges, config)
        return groups[3][0], [r["orig_group"] for r in ranges]

    with cpu_emulation():  # (the shards are built from params of a cuda type)
        _, groups = shard_groups()
        with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
            _hybrid_optimizer(groups)
        fixes.offloaded_fp32_shards_are_leaves(patches)
        shards, groups = shard_groups()
        _hybrid_optimizer(groups)
    assert shards[0].is_leaf and groups[0]["params"][0] is shards[0]
    shards[0].add_(1.0)  # the same memory as the param's
    assert param.detach().tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 5.0]


def test_offloaded_optimizer_state_without_classes(upstream, patches, tmp_path):
    with cpu_emulation():
        optimizer = _hybrid_optimizer([torch.nn.Parameter(torch.ones(4))])
    torch.save(optimizer.state_dict(), tmp_path / "upstream.pt")
    with pytest.raises(Exception, match="Unsupported global: GLOBAL torch.optim.adamw.AdamW"):
        torch.load(tmp_path / "upstream.pt", weights_only=True)
    fixes.offloaded_optimizer_state_without_classes(patches)
    torch.save(optimizer.state_dict(), tmp_path / "fixed.pt")
    groups = torch.load(tmp_path / "fixed.pt", weights_only=True)["param_groups"]
    assert groups[0]["lr"] == 0.1 and "cpu_optimizer_cls" not in groups[0]


def test_offloaded_fp32_params_load(upstream, patches):
    param = torch.nn.Parameter(torch.ones(4))
    with cpu_emulation():
        optimizer = _hybrid_optimizer([param])
        param.grad = torch.ones(4)
        optimizer.step()
        host = optimizer.gpu_params_map_cpu_copy[param]
        optimizer.state[param]["master_param"] = torch.full((4,), 3.0)  # as a checkpoint load sets it
        with pytest.raises(KeyError):
            optimizer._update_fp32_params_by_new_state()
        fixes.offloaded_fp32_params_load(patches)
        optimizer._update_fp32_params_by_new_state()
    assert host.tolist() == [3.0] * 4


# ---------------------------------------------------------------------------------------------
# CPU emulation


def test_hybrid_optimizer_offloads_on_cpu():
    from megatron.core.optimizer.cpu_offloading import hybrid_optimizer as ho

    upstream_groups = ho.HybridDeviceOptimizer._get_sub_optimizer_param_groups
    start = torch.randn(8)
    grads = [torch.randn(8) for _ in range(3)]
    reference = torch.nn.Parameter(start.clone())
    adamw = torch.optim.AdamW([reference], lr=0.1, fused=True)
    for grad in grads:
        reference.grad = grad
        adamw.step()
    with cpu_emulation():
        unpatched = Patches()
        unpatched.set(ho.HybridDeviceOptimizer, "_get_sub_optimizer_param_groups", upstream_groups)
        try:
            param = torch.nn.Parameter(start.clone())
            optimizer = _hybrid_optimizer([param])
            param.grad = grads[0]
            with pytest.raises(KeyError):
                optimizer.step()
        finally:
            unpatched.restore()
        param = torch.nn.Parameter(start.clone())
        optimizer = ho.HybridDeviceOptimizer([param], offload_fraction=1.0, cpu_optimizer_cls=torch.optim.AdamW,
                                             gpu_optimizer_cls=torch.optim.AdamW, param_update_in_fp32=True,
                                             lr=0.1, fused=True)
        for grad in grads:
            param.grad = grad
            optimizer.step()
    host = optimizer.gpu_params_map_cpu_copy[param]
    assert host is not param and optimizer.gpu_optimizer is None  # stepped on a host copy, copied back
    assert torch.equal(param.detach(), reference.detach())


def test_checkpoint_results_queue_by_fork(monkeypatch):
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fa

    class Asked(Exception):
        pass

    def asked(method=None):
        raise Asked(method)

    # upstream starts its Manager with spawn: a fresh interpreter importing the entry module again
    monkeypatch.setattr(fa, "_results_queue", None)
    with monkeypatch.context() as m:
        m.setattr(fa.mp, "get_context", asked)
        with pytest.raises(Asked, match="^spawn$"):
            fa._get_write_results_queue()
    monkeypatch.setattr(emulation, "_results_queue", None)
    with cpu_emulation():
        with monkeypatch.context() as m:
            m.setattr(fa.mp, "get_context", asked)
            with pytest.raises(Asked, match="^fork$"):
                fa._get_write_results_queue()
        queue = fa._get_write_results_queue()
        assert fa._get_write_results_queue() is queue  # one per process
        queue.put({"written": 1})
        assert queue.get() == {"written": 1}


def test_rng_tracker_on_cpu_generator():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    with pytest.raises(AssertionError, match=NOT_COMPILED):
        CudaRNGStatesTracker().add("model-parallel-rng", 5)
    torch.manual_seed(0)
    outside = torch.get_rng_state()
    with cpu_emulation():
        tracker = CudaRNGStatesTracker()
        tracker.add("model-parallel-rng", 5)
        assert torch.equal(torch.get_rng_state(), outside)  # the default stream is left as it was
        with tracker.fork("model-parallel-rng"):
            drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))


@pytest.mark.parametrize("call, error, words", [
    (lambda: torch.cuda.current_device(), AssertionError, NOT_COMPILED),
    (lambda: torch.cuda.synchronize(), AssertionError, NOT_COMPILED),
    (lambda: torch.cuda.Stream(), RuntimeError, "requires CUDA support"),
    (lambda: torch.cuda.Event(), RuntimeError, "dummy base class Event"),
    (lambda: torch.zeros(2, device="cuda"), AssertionError, NOT_COMPILED),
], ids=["current_device", "synchronize", "Stream", "Event", "device_cuda"])
def test_cuda_apis_answered_on_cpu(call, error, words):
    with pytest.raises(error, match=words):
        call()
    with cpu_emulation():
        call()
        assert torch.zeros(2, device="cuda").device.type == "cpu" and torch.zeros(1).cuda().device.type == "cpu"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"  # megatron's optimizer checks this name
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())


def test_rope_slice_per_context_parallel_rank():
    """megatron's RoPE slice for a CP rank builds its chunk index pinned; under emulation the slice
    is rank r's chunks r and 2cp-1-r."""
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    class Group:  # what the function asks of a process group: cp=2, rank 1
        def size(self):
            return 2

        def rank(self):
            return 1

    emb = torch.arange(8.0).view(8, 1, 1, 1)
    with pytest.raises(RuntimeError, match="pin_memory"):
        get_pos_emb_on_this_cp_rank(emb, 0, Group())
    with cpu_emulation():
        got = get_pos_emb_on_this_cp_rank(emb, 0, Group())
    assert got.flatten().tolist() == [2.0, 3.0, 4.0, 5.0]


def test_moe_split_sizes_as_numpy():
    import megatron.core.transformer.moe.token_dispatcher as td

    sizes = torch.tensor([3])
    assert torch.is_tensor(td.maybe_move_tensor_to_cpu(sizes, as_numpy=True))  # CPU tensors stay tensors
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="incompatible function arguments"):
            dist.all_to_all_single(torch.empty(3), torch.ones(3), output_split_sizes=sizes, input_split_sizes=sizes)
        with cpu_emulation():
            converted = td.maybe_move_tensor_to_cpu(sizes, as_numpy=True)
        assert isinstance(converted, np.ndarray) and converted.tolist() == [3]
        out = torch.empty(3)
        dist.all_to_all_single(out, torch.ones(3), output_split_sizes=converted, input_split_sizes=converted)
        assert torch.equal(out, torch.ones(3))
    finally:
        dist.destroy_process_group()


def _gather_on_two_ranks(gather) -> dict[int, object]:
    """Rank r (a thread with its own gloo group) holds r + 1 rows of value r; gather(rows, group, sizes)."""
    store, results = dist.HashStore(), {}

    def rank(r: int) -> None:
        group = dist.ProcessGroupGloo(store, r, 2)
        try:
            results[r] = gather(torch.full((r + 1, 2), float(r)), group, [1, 2])
        except RuntimeError as err:
            results[r] = err

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_uneven_all_gather_on_gloo():
    import megatron.core.tensor_parallel.mappings as mp

    unpatched = mp._gather_along_first_dim
    with cpu_emulation():  # (both make their output on torch.cuda.current_device())
        failed = _gather_on_two_ranks(unpatched)
        gathered = _gather_on_two_ranks(mp._gather_along_first_dim)
    assert all("ProcessGroupGloo::allgather: invalid tensor size" in str(failed[r]) for r in range(2)), failed
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    assert all(torch.equal(gathered[r], expected) for r in range(2)), gathered


def test_cpu_emulation_restores_every_original_and_nests():
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fa
    import megatron.core.tensor_parallel.mappings as mp
    import megatron.core.tensor_parallel.random as mr
    import megatron.core.transformer.moe.moe_utils as mu
    import megatron.core.transformer.moe.token_dispatcher as td

    watched = [(torch.cuda, n) for n in ("current_device", "synchronize", "Stream", "Event", "current_stream",
                                         "default_stream", "stream", "get_rng_state", "manual_seed")]
    watched += [(mr, "_get_cuda_rng_state"), (mr, "_set_cuda_rng_state"), (mr.CudaRNGStatesTracker, "add"),
                (mu, "maybe_move_tensor_to_cpu"), (td, "maybe_move_tensor_to_cpu"), (mp, "_gather_along_first_dim"),
                (fa, "_get_write_results_queue")]
    before = [vars(owner).get(name) for owner, name in watched]
    modes = torch.overrides._get_current_function_mode_stack()
    with cpu_emulation():
        inner = [vars(owner).get(name) for owner, name in watched]
        with cpu_emulation():  # nested: the same patches, still on after the inner exit
            assert [vars(owner).get(name) for owner, name in watched] == inner
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        assert [vars(owner).get(name) for owner, name in watched] == inner
    assert [vars(owner).get(name) for owner, name in watched] == before
    assert torch.overrides._get_current_function_mode_stack() == modes
    with pytest.raises(AssertionError, match=NOT_COMPILED):
        torch.zeros(1, device="cuda")


def test_init_distributed_on_cpu_emulates_until_shutdown():
    from parallel.layout import Layout
    from parallel.megatron_engine import init_distributed, shutdown

    current_device = torch.cuda.current_device
    init_distributed(Layout(world_size=1), torch.device("cpu"), seed=1)
    try:
        assert torch.cuda.current_device() == torch.device("cpu")
    finally:
        shutdown()
    assert torch.cuda.current_device is current_device
