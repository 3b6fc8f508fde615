"""Run megatron-core on a CPU-only torch build with gloo, inside `with cpu_emulation():`.

megatron-core assumes CUDA throughout. The patches below make the same code paths run on CPU so
that every parallel layout can be tested (and debugged on a laptop) with real process groups.
Each names the error it removes. They are installed on entering the outermost `cpu_emulation()`
and every original is put back on leaving it; on a GPU nothing here is entered.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from parallel.compat.patching import Patches
from parallel.compat.version import check_megatron_version

_depth = 0
_patches: Patches | None = None
_mode: TorchFunctionMode | None = None


@contextlib.contextmanager
def cpu_emulation() -> Iterator[None]:
    """CUDA APIs answered on the CPU while inside; nested entries share the outermost one's patches."""
    global _depth
    if _depth == 0:
        _install()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _uninstall()


def active() -> bool:
    return _depth > 0


def _install() -> None:
    global _patches, _mode
    check_megatron_version()
    patches = Patches()
    for patch in (_rng_tracker_on_cpu_generator, _current_device, _synchronize, _streams_and_events,
                  _moe_split_sizes_as_numpy, _uneven_all_gather, _hybrid_optimizer_device_params,
                  _checkpoint_results_queue_by_fork):
        patch(patches)
    # The mode stack is per thread: entered on the thread that enters cpu_emulation, where megatron runs.
    _mode = _CudaToCpu()
    _mode.__enter__()
    _patches = patches


def _uninstall() -> None:
    global _patches, _mode
    _mode.__exit__(None, None, None)
    _patches.restore()
    _patches = _mode = None


def _rng_tracker_on_cpu_generator(patches: Patches) -> None:
    # tensor_parallel/random.py keeps per-TP-rank RNG states via torch.cuda.get_rng_state and
    # CUDA generators: "AssertionError: Torch not compiled with CUDA enabled". Keep them on the CPU
    # generator: the two state helpers read and write it, and CudaRNGStatesTracker.add runs with
    # torch.cuda's get_rng_state / manual_seed meaning the CPU generator's for its duration.
    import megatron.core.tensor_parallel.random as mr

    patches.set(mr, "_get_cuda_rng_state", lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    patches.set(mr, "_set_cuda_rng_state", lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))

    def add(self, name: str, seed: int) -> None:
        on_cpu = Patches()
        on_cpu.set(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
        on_cpu.set(torch.cuda, "manual_seed", torch.manual_seed)
        try:
            original(self, name, seed)
        finally:
            on_cpu.restore()

    original = patches.set(mr.CudaRNGStatesTracker, "add", add)


def _current_device(patches: Patches) -> None:
    # torch.cuda.current_device() is called throughout (RoPE, buffers, schedules):
    # "AssertionError: Torch not compiled with CUDA enabled" on a CPU build. Answer with the CPU.
    patches.set(torch.cuda, "current_device", lambda: torch.device("cpu"))


def _synchronize(patches: Patches) -> None:
    # p2p communication, timers and the optimizer call torch.cuda.synchronize():
    # "AssertionError: Torch not compiled with CUDA enabled" on a CPU build.
    patches.set(torch.cuda, "synchronize", lambda *a, **k: None)


class _FakeEvent:
    def __init__(self, *a, **k): pass
    def record(self, stream=None): pass
    def synchronize(self): pass
    def wait(self, stream=None): pass
    def query(self): return True
    def elapsed_time(self, other): return 0.0


class _FakeStream:
    def __init__(self, *a, **k): pass
    def wait_stream(self, s): pass
    def wait_event(self, e): pass
    def record_event(self, e=None): return _FakeEvent()
    def synchronize(self): pass
    def query(self): return True


def _streams_and_events(patches: Patches) -> None:
    # The MoE alltoall dispatcher builds torch.cuda.Stream() in __init__ ("RuntimeError:
    # torch.cuda.Stream requires CUDA support"); DDP/optimizer overlap code uses current_stream and
    # Event ("RuntimeError: Tried to instantiate dummy base class Event"). CPU work is synchronous:
    # inert stand-ins.
    default = _FakeStream()
    patches.set(torch.cuda, "Stream", _FakeStream)
    patches.set(torch.cuda, "Event", _FakeEvent)
    patches.set(torch.cuda, "current_stream", lambda *a, **k: default)
    patches.set(torch.cuda, "default_stream", lambda *a, **k: default)
    patches.set(torch.cuda, "stream", lambda s=None: contextlib.nullcontext())


def _moe_split_sizes_as_numpy(patches: Patches) -> None:
    # The alltoall dispatcher's maybe_move_tensor_to_cpu(as_numpy=True) only converts CUDA
    # tensors; CPU split sizes stay tensors and dist.all_to_all_single(output_split_sizes=...)
    # raises "TypeError: all_to_all_single(): incompatible function arguments". Convert CPU
    # tensors too; CUDA ones go to the upstream function.
    import megatron.core.transformer.moe.moe_utils as mu
    import megatron.core.transformer.moe.token_dispatcher as td

    original = mu.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    patches.set(mu, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    patches.set(td, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


def _uneven_all_gather(patches: Patches) -> None:
    # MoE with expert TP > 1 gathers a different number of routed tokens from each TP rank
    # (tensor_parallel.mappings._gather_along_first_dim with output_split_sizes), through
    # dist.all_gather with unequal tensors: gloo raises "RuntimeError: ProcessGroupGloo::allgather:
    # invalid tensor size". Pad every piece to the largest, let upstream gather equal pieces, trim.
    import megatron.core.tensor_parallel.mappings as mp

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        gathered = original(padded, group, [longest] * len(sizes), False)
        return torch.cat([piece[:n] for piece, n in zip(gathered.split(longest), sizes)], dim=0)

    original = patches.set(mp, "_gather_along_first_dim", _gather_along_first_dim)


def _hybrid_optimizer_device_params(patches: Patches) -> None:
    # HybridDeviceOptimizer (optimizer CPU offload) gives host copies only to params with
    # `is_cuda`; on CPU none qualifies, none is copied, and its first step fails with "KeyError:
    # tensor(...)" looking up the device param of a host-side param. While it sorts its params,
    # the ones it was given count as device params, so each gets its host copy and the step runs
    # the offload path (grads copied out, host step, params copied back).
    from megatron.core.optimizer.cpu_offloading import hybrid_optimizer as ho

    def _get_sub_optimizer_param_groups(self, offload_fraction: float):
        given = {id(p) for group in self.param_groups for p in group["params"]}
        on_device = Patches()
        on_device.set(torch.Tensor, "is_cuda", property(lambda t: id(t) in given))
        try:
            return original(self, offload_fraction)
        finally:
            on_device.restore()

    original = patches.set(ho.HybridDeviceOptimizer, "_get_sub_optimizer_param_groups",
                           _get_sub_optimizer_param_groups)


_results_queue: Any = None  # the forked Manager's queue, one per process (as upstream keeps one)


def _checkpoint_results_queue_by_fork(patches: Patches) -> None:
    # dist_checkpointing's writer hands its results over through a multiprocessing Manager queue
    # started with "spawn" (a CUDA process must not fork): a fresh interpreter that re-imports the
    # entry module (torch, the launcher) before it serves, seconds of CPU in every process that
    # saves. Without CUDA there is nothing to protect, and the writer forks its own workers anyway:
    # start the Manager by fork.
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fa

    def _get_write_results_queue():
        global _results_queue
        if _results_queue is None:
            _results_queue = fa.mp.get_context("fork").Manager().Queue()
        return _results_queue

    patches.set(fa, "_get_write_results_queue", _get_write_results_queue)


def _cpu(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device="cuda" to cpu on every torch call; .cuda() / .to("cuda") / .pin_memory() become
    no-ops; pin_memory=True is dropped (the slice of RoPE frequencies per context-parallel rank builds its
    index pinned: "RuntimeError: pin_memory=True requires a CUDA or other accelerator backend").

    Many sites hard-code CUDA (schedules' token counters, optimizer found_inf, clip_grads,
    dist_checkpointing exchange, grad buffers): "AssertionError: Torch not compiled with CUDA
    enabled". The optimizer and clip_grads also dispatch on `param.type() ==
    "torch.cuda.FloatTensor"` ("Wrapped parameters must be one of torch.cuda.FloatTensor ..."),
    so CPU tensors report their cuda type name.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and ".cuda." not in name:
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return func(*args, **kwargs)
