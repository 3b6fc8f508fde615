"""Run megatron-core 0.16.1 on a CPU-only torch build with gloo.

megatron-core assumes CUDA throughout. These patches make the same code paths run on CPU so
that every parallel layout can be tested (and debugged on a laptop) with real process
groups. Each patch names the error it removes. `apply()` is idempotent and is only called
when `device=cpu`; on a GPU nothing here is touched.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_mode: TorchFunctionMode | None = None


def apply() -> None:
    """Install every patch below (once per process)."""
    global _applied
    if _applied:
        return
    _patch_rng_tracker()
    _patch_current_device()
    _patch_cuda_device_arguments()
    _patch_synchronize()
    _patch_streams_and_events()
    _patch_moe_split_sizes()
    _patch_uneven_all_gather()
    _applied = True


def _patch_rng_tracker() -> None:
    # tensor_parallel/random.py keeps per-TP-rank RNG states via torch.cuda.get_rng_state and
    # CUDA generators: "Torch not compiled with CUDA enabled". Keep them on the CPU generator.
    import megatron.core.tensor_parallel.random as mr

    mr._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mr._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mr.CudaRNGStatesTracker.add = add


def _patch_current_device() -> None:
    # torch.cuda.current_device() is called in ~175 places (RoPE, buffers, schedules):
    # it raises on a CPU build. Answer with the CPU device.
    torch.cuda.current_device = lambda: torch.device("cpu")


def _cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device="cuda" to cpu on every torch call; .cuda() / .to("cuda") become no-ops.

    ~120 sites hard-code CUDA (schedules' token counters, optimizer found_inf, clip_grads,
    dist_checkpointing exchange, grad buffers). The optimizer and clip_grads also dispatch on
    `param.type() == "torch.cuda.FloatTensor"` ("Wrapped parameters must be one of
    torch.cuda.FloatTensor ..."), so CPU tensors report their cuda type name.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and ".cuda." not in name:
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return func(*args, **kwargs)


def _patch_cuda_device_arguments() -> None:
    # The mode stack is per thread: installed on the main thread, where megatron runs.
    global _mode
    _mode = _CudaToCpu()
    _mode.__enter__()


def _patch_synchronize() -> None:
    # p2p communication, timers and the optimizer call torch.cuda.synchronize(): raises on CPU.
    torch.cuda.synchronize = lambda *a, **k: None


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


def _patch_streams_and_events() -> None:
    # The MoE alltoall dispatcher builds torch.cuda.Stream() in __init__; DDP/optimizer
    # overlap code uses current_stream/Event. CPU work is synchronous: inert stand-ins.
    default = _FakeStream()
    torch.cuda.Stream = _FakeStream
    torch.cuda.Event = _FakeEvent
    torch.cuda.current_stream = lambda *a, **k: default
    torch.cuda.default_stream = lambda *a, **k: default
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()


def _patch_moe_split_sizes() -> None:
    # The alltoall dispatcher's maybe_move_tensor_to_cpu(as_numpy=True) only converts CUDA
    # tensors; CPU split sizes stay tensors and dist.all_to_all_single(output_split_sizes=...)
    # raises "incompatible function arguments". Convert CPU tensors too.
    import megatron.core.transformer.moe.moe_utils as mu
    import megatron.core.transformer.moe.token_dispatcher as td

    original = mu.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    mu.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    td.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_all_gather() -> None:
    # MoE with expert TP > 1 gathers a different number of routed tokens from each TP rank
    # (tensor_parallel.mappings._gather_along_first_dim with output_split_sizes), through
    # dist.all_gather with unequal tensors: gloo raises "ProcessGroupGloo::allgather: invalid
    # tensor size". Pad every piece to the largest, gather equal tensors, then trim.
    import megatron.core.tensor_parallel.mappings as mp

    original = mp._gather_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)], dim=0)

    mp._gather_along_first_dim = _gather_along_first_dim
