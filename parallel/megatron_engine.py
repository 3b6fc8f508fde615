"""The megatron-core engine: process groups, model chunks, DDP, distributed optimizer, schedules.

One optimizer step = `get_forward_backward_func()` over this DP rank's micro batches (1F1B,
interleaved 1F1B with virtual stages, or no pipelining), then the distributed optimizer's
step. Loss is token-weighted over the whole global batch (`calculate_per_token_loss`), so
every layout and micro-batching optimizes the same objective. A preference objective
(parallel/preference_loss.py) weights by pairs instead, through the same mechanism; DPO with a
live reference holds a frozen copy of the model chunks (same layout, no gradients, eval mode),
whose forward-only pass over a step's micro batches gives them their reference log-probs.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module

from models.init import init_weights
from models.lora import LoraOptions, adapters_off, embeddings_require_grad, freeze_base, is_adapter
from models.args import ModelArgs
from models.kernel_provider import KernelOptions
from models.llama import build_llama, transformer_config
from parallel.engine_config import OptimConfig
from parallel.layout import Layout
from parallel import grad_accum_fusion
from parallel.compile_layers import compile_layers
from parallel.cuda_graph import wrap as cuda_graph_wrap
from parallel.engine import StepResult, context_parallel_split, prepare_batch
from parallel.fused_adam import as_megatron_adam, precision_aware
from parallel.pinned_memory import release_cached_pinned_blocks
from parallel.grad_scaling import FoldedGradScaling
from parallel.lr_schedule import load_schedule, lr_scheduler
from parallel.preference_loss import (PREFERENCE_METRICS, REPORT_KEY, ObjectiveConfig, logps_loss_func,
                                      preference_loss_func)
from parallel import lora_checkpoint, megatron_state
from parallel.lora_grads import with_partial_grad_sum
from parallel import compat

# Checkpoint keys of DPO's live reference chunks: this prefix + the model's own keys.
REFERENCE_PREFIX = "reference."
# The common-state flag of a checkpoint that holds them.
LIVE_REFERENCE = "live_reference"

# What init_distributed started (CPU emulation of CUDA APIs, the process group), undone by
# shutdown(). A process group that already existed (a test session running several trainings
# under one torchrun) belongs to its creator and stays up.
_started = contextlib.ExitStack()


def init_distributed(layout: Layout, device: torch.device, seed: int, cuda_graph: bool = False) -> None:
    """Start torch.distributed (gloo on CPU, NCCL on GPU) and megatron-core's process groups.
    `cuda_graph`: RNG streams as torch.Generators, which a CUDA graph can register and advance."""
    compat.apply_fixes()
    if device.type == "cpu":  # left by shutdown()
        _started.enter_context(compat.cpu_emulation())
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if cuda_graph:
            # Autograd records the stream of each parameter's gradient accumulator when megatron's
            # DDP creates it; on the legacy default stream, the captured backward would have to
            # sync with it, which capture forbids. A side stream for the whole run joins the capture.
            torch.cuda.set_stream(torch.cuda.Stream())
    if not dist.is_initialized():
        backend = "gloo" if device.type == "cpu" else "nccl"
        if "MASTER_ADDR" in os.environ:  # torchrun / srun
            dist.init_process_group(backend, timeout=timedelta(minutes=10))
        else:  # plain `python -m launcher.train`: a world of one, no port to collide on
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _started.callback(dist.destroy_process_group)
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                                 virtual_pipeline_model_parallel_size=layout.vpp,
                                 context_parallel_size=layout.cp, expert_model_parallel_size=layout.ep)
    # Per-TP-rank RNG streams (dropout); weights do not depend on them (models.init).
    model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=cuda_graph)
    torch.manual_seed(seed)


def shutdown() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _started.close()


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    losses = output.float() * loss_mask
    total = losses.sum()
    count = loss_mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), count.detach().float()])}


def _lm_loss(batch: dict[str, Any]):
    return partial(_loss_func, batch["loss_mask"])


def _forward_step(device: torch.device, loss_for: Callable[[dict[str, Any]], Callable], offload: bool,
                  data_iterator, model):
    """One micro batch through this stage; `loss_for(batch)` is the last stage's loss function of it.
    `offload`: what the forward saves for the backward goes to host memory (torch's save_on_cpu)."""
    batch, packed = prepare_batch(next(data_iterator), device)
    # this CP rank's two chunks of each row or packed document (all of it at cp=1)
    batch, packed = context_parallel_split(batch, packed)
    saved = torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda") if offload else contextlib.nullcontext()
    with saved:  # Last stage returns per-token losses; earlier stages their hidden states.
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       loss_mask=batch["loss_mask"], packed_seq_params=packed)
    return output, loss_for(batch)


@contextlib.contextmanager
def _eval_mode(chunks: list[torch.nn.Module]):
    for chunk in chunks:
        chunk.eval()
    try:
        yield
    finally:
        for chunk in chunks:
            chunk.train()


def use_fused_adamw(optimizer) -> None:
    """Step torch AdamW with its fused kernel (CUDA and CPU). Without apex/TE megatron-core builds
    torch AdamW in its default foreach mode, ~8 passes over the fp32 states per step; the fused
    kernel makes one, and it can apply the gradient
    scales itself (parallel/grad_scaling.py)."""
    for chained in optimizer.chained_optimizers:
        inner = chained.optimizer
        if isinstance(inner, torch.optim.AdamW):
            for group in (inner.defaults, *inner.param_groups):
                group["fused"], group["foreach"] = True, False


def host_optimizer(config: OptimizerConfig) -> OptimizerConfig:
    """megatron-core's optimizer CPU offload (HybridDeviceOptimizer) for every parameter: the distributed
    optimizer's shards get fp32 copies in host memory with their Adam moments, torch's fused
    AdamW steps them there, and the updated values are copied back. Through the precision-aware path,
    so bf16 params get no fp32 main copy on the device; grads copy to the host and params back on
    side streams, each parameter's CPU step waiting only for its own gradient."""
    config.optimizer_cpu_offload = True
    config.optimizer_offload_fraction = 1.0
    config.overlap_cpu_optimizer_d2h_h2d = True
    config.use_precision_aware_optimizer = True
    config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 = True
    return config


class MegatronEngine:
    def __init__(self, args: ModelArgs, layout: Layout, optim: OptimConfig, *, steps: int, seq_length: int,
                 micro_batch_size: int, seed: int, device: torch.device, params_dtype: torch.dtype,
                 recompute: str | list[str] | None, backend: str, distributed_optimizer: bool = True,
                 overlap_grad_reduce: bool = False, compile: bool = False, cuda_graph: bool = False,
                 fp8: bool = False, cp_mode: str = "ring", moe_dispatch: str = "megatron",
                 attention_backend: str = "auto",
                 keep_saved_schedule: bool = False, objective: ObjectiveConfig = ObjectiveConfig(),
                 lora: LoraOptions | None = None, offload_activations: bool = False):
        self.args, self.layout, self.device = args, layout, device
        self.offload_activations = offload_activations
        self.seed, self.lora = seed, lora
        self.lora_base: str | None = None  # the checkpoint the adapters' frozen base came from (None: the seed's)
        self.objective = objective
        self._train_loss = self._preference_loss if objective.preference else _lm_loss
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        # models/kernel_provider.py picks every module class of the model from these
        kernels = KernelOptions(device=device.type, backend=backend, fp8=fp8, cp_mode=cp_mode, lora=lora,
                                moe_dispatch=moe_dispatch, attention_backend=attention_backend,
                                objective=objective.name)
        self.config = transformer_config(args, tp=layout.tp, pp=layout.pp, vpp=layout.vpp, params_dtype=params_dtype,
                                         on_cpu=device.type == "cpu", recompute=recompute, ep=layout.ep,
                                         cp=layout.cp)
        # Weight gradients accumulate into the fp32 main grads inside their GEMM (set before the
        # model is built: megatron's linears read it at construction). Not under compiled layers:
        # that in-place update of main_grad in the backward is not traced.
        self.config.gradient_accumulation_fusion = not compile and grad_accum_fusion.enable(device)
        chunks = []
        for vp_stage in range(layout.vpp or 1):
            vp = vp_stage if layout.vpp else None
            chunk = build_llama(args, self.config, kernels,
                                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                                vp_stage=vp)
            if device.type == "cuda":
                chunk.cuda(device)
            init_weights(chunk, seed=seed, std=args.init_method_std, num_layers=args.num_layers)
            if lora is not None:  # (before DDP and the optimizer: they take only what trains)
                freeze_base(chunk)
                if self.config.recompute_granularity is not None:
                    embeddings_require_grad(chunk)
            if compile:
                compile_layers(chunk)
            if params_dtype == torch.bfloat16:
                chunk = Float16Module(self.config, chunk)
            chunks.append(chunk)
        # DPO's live reference: the same chunks, frozen; freeze_reference() gives them the policy's weights.
        # Under LoRA the reference is the frozen base: the policy's own chunks with their adapters off.
        self.reference_chunks = [self._frozen_copy(args, kernels, chunk, params_dtype)
                                 for chunk in chunks] if objective.live_reference and lora is None else []
        # bf16 main grads (precision-aware only): with one micro batch a step they hold what the
        # wgrad GEMM's bf16 epilogue wrote; half the buffer's memory and bytes (norm, AdamW, zeroing).
        bf16_grads = (optim.precision_aware or optim.cpu_offload) and optim.main_grads_dtype == "bf16"
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=not bf16_grads,
                                                   overlap_grad_reduce=overlap_grad_reduce,
                                                   use_distributed_optimizer=distributed_optimizer)
        self.chunks = [DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=chunk,
                                               disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
        self.config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        if overlap_grad_reduce:
            self.config.grad_sync_func = [c.start_grad_sync for c in self.chunks]

        optimizer_config = OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.beta1, adam_beta2=optim.beta2, adam_eps=optim.eps,
            clip_grad=optim.clip_grad, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
            use_distributed_optimizer=distributed_optimizer)
        if optim.precision_aware:  # parallel/fused_adam.py: bf16 params hold the master weights' top half
            moments = torch.bfloat16 if optim.moments_dtype == "bf16" else torch.float32
            with as_megatron_adam(stochastic_rounding=optim.master_weights == "stochastic", seed=seed):
                grads = torch.bfloat16 if bf16_grads else torch.float32
                self.optimizer = get_megatron_optimizer(precision_aware(optimizer_config, moments, grads), self.chunks)
        elif optim.cpu_offload:  # fp32 masters and moments on the host, stepped there
            self.optimizer = get_megatron_optimizer(host_optimizer(optimizer_config), self.chunks)
            release_cached_pinned_blocks(device)
        else:
            self.optimizer = get_megatron_optimizer(optimizer_config, self.chunks)
            use_fused_adamw(self.optimizer)
        self.grad_scaling = FoldedGradScaling(self.optimizer, optim.clip_grad, device) \
            if FoldedGradScaling.applies(self.optimizer) else None
        self.config.finalize_model_grads_func = (self.grad_scaling.finalize_model_grads if self.grad_scaling
                                                 else finalize_model_grads)
        if lora is not None and layout.tp > 1:
            self.config.finalize_model_grads_func = with_partial_grad_sum(self.config.finalize_model_grads_func)
        self.scheduler = lr_scheduler(self.optimizer, optim, steps, keep_saved_schedule)
        self._forward_backward = get_forward_backward_func()
        self._forward_only = self._forward_backward  # evaluation: never the captured training graph
        if cuda_graph:  # parallel/cuda_graph.py: steps from the second on replay one graph
            self._forward_backward = cuda_graph_wrap(self._forward_backward)
        self.moe_stats = None
        if args.is_moe:
            from parallel.moe_metrics import MoEStats

            compat.set_moe_aux_loss_factor(self.config)
            self.moe_stats = MoEStats([c.module for c in self.chunks], args, device)

    def _frozen_copy(self, args: ModelArgs, kernels: KernelOptions, chunk: torch.nn.Module,
                     params_dtype: torch.dtype) -> torch.nn.Module:
        """A model chunk built like `chunk` (before DDP wraps it), holding its weights, without gradients, in eval mode."""
        inner = chunk.module if isinstance(chunk, Float16Module) else chunk
        copy = build_llama(args, self.config, kernels, pre_process=inner.pre_process, post_process=inner.post_process,
                           vp_stage=getattr(inner, "vp_stage", None))
        if self.device.type == "cuda":
            copy.cuda(self.device)
        if params_dtype == torch.bfloat16:
            copy = Float16Module(self.config, copy)
        copy.load_state_dict(chunk.state_dict())
        copy.requires_grad_(False)
        return copy.eval()

    def freeze_reference(self) -> None:
        """DPO's live reference takes the policy's current weights (a run's initial weights: call it once
        the starting checkpoint is loaded)."""
        with torch.no_grad():
            for reference, chunk in zip(self.reference_chunks, self.chunks):
                reference.load_state_dict(chunk.module.state_dict())

    @torch.no_grad()
    def _with_live_reference(self, microbatches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The micro batches with the frozen reference's summed log-probs per sequence (`reference_logps`)
        on the last pipeline stage, which computes the loss (collective over the model-parallel group)."""
        logps = lambda batch: partial(logps_loss_func, batch)  # noqa: E731
        if self.reference_chunks:
            reports = self._schedule(self._forward_only, microbatches, forward_only=True, loss_for=logps,
                                     model=self.reference_chunks)
        else:  # LoRA: the base alone
            with adapters_off(self.chunks), _eval_mode(self.chunks):
                reports = self._schedule(self._forward_only, microbatches, forward_only=True, loss_for=logps)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return microbatches
        return [{**mb, "reference_logps": report["logps"]} for mb, report in zip(microbatches, reports)]

    def _scale_moe_aux_loss(self, microbatches: list[dict[str, Any]]) -> None:
        """The routers scale their aux / z losses by the tokens they route, for gradients divided by the
        global loss-token count; a preference loss divides them by the global pair count P instead.
        Scaling them by P / (tokens of the global batch's rows) keeps each micro batch's aux loss
        weighted 1 / (micro batches in the global batch), as for the LM loss."""
        rows = sum(int(mb["tokens"].shape[0]) for mb in microbatches) * ps.get_data_parallel_world_size()
        pairs = int(microbatches[0]["pairs_global"])
        compat.set_moe_aux_loss_factor(self.config, scale=pairs / (rows * self.seq_length))

    def _preference_loss(self, batch: dict[str, Any]) -> Callable:
        return partial(preference_loss_func, self.objective, batch)

    def num_parameters(self) -> int:
        """Parameters held by this rank (its TP/PP shard)."""
        return sum(p.numel() for c in self.chunks for p in c.parameters())

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for c in self.chunks for p in c.parameters() if p.requires_grad)

    def train_step(self, microbatches: list[dict[str, torch.Tensor]]) -> StepResult:
        if self.device.type == "cuda":  # pinned: their copies to the GPU queue behind the running step
            # (contiguous first: an expanded tensor, e.g. shared position ids, cannot be pinned as it is)
            microbatches = [{k: v.contiguous().pin_memory() if torch.is_tensor(v) and not v.is_cuda else v
                             for k, v in mb.items()}
                            for mb in microbatches]
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.objective.live_reference:
            microbatches = self._with_live_reference(microbatches)
        if self.objective.preference and self.moe_stats is not None:
            self._scale_moe_aux_loss(microbatches)
        reports = self._schedule(self._forward_backward, microbatches, forward_only=False, loss_for=self._train_loss)
        # The scheduler sets the lr this step uses (step 1 of warmup is lr/warmup, never 0).
        self.scheduler.step(increment=1)
        if self.grad_scaling is not None:
            grad_norm = self.grad_scaling.step()
        else:
            _, grad_norm, _ = self.optimizer.step()
        loss_sum, num_tokens = self._global_loss(reports)
        moe = self.moe_stats.step_metrics(len(microbatches)) if self.moe_stats is not None else {}
        norm = (grad_norm.to(loss_sum) if torch.is_tensor(grad_norm)  # (a fill, not a host-to-device copy)
                else torch.full((), grad_norm or 0.0, dtype=torch.float64, device=loss_sum.device))
        values = torch.stack([loss_sum, num_tokens, norm])
        names: tuple[str, ...] = ()
        if self.objective.preference:  # the step's preference metrics: means over its pairs
            values = torch.cat([values, self._global_sums(reports, REPORT_KEY, len(PREFERENCE_METRICS)) / num_tokens])
            names = PREFERENCE_METRICS
        return StepResult(values, lr=self.optimizer.param_groups[0]["lr"], moe=moe, metric_names=names)

    @torch.no_grad()
    def sequence_logps(self, microbatches: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """Forward only, in eval mode: each row's summed target log-probs, rows of the micro batches in
        order, on the last pipeline stage (None elsewhere). Collective over the model-parallel group."""
        for chunk in self.chunks:
            chunk.eval()
        try:
            reports = self._schedule(self._forward_only, microbatches, forward_only=True,
                                     loss_for=lambda batch: partial(logps_loss_func, batch))
        finally:
            for chunk in self.chunks:
                chunk.train()
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        return torch.cat([r["logps"] for r in reports])

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """The training forward (same schedule, loss and reduction) without backward or step, in
        eval mode: no dropout, and MoE routers neither add aux losses nor count tokens for the
        expert bias or the step's MoE metrics (both only with gradients enabled)."""
        if self.objective.live_reference:
            microbatches = self._with_live_reference(microbatches)
        for chunk in self.chunks:
            chunk.eval()
        try:
            reports = self._schedule(self._forward_only, microbatches, forward_only=True, loss_for=self._train_loss)
        finally:
            for chunk in self.chunks:
                chunk.train()
        loss_sum, num_tokens = self._global_loss(reports)
        return loss_sum.item(), int(num_tokens.item())

    def _schedule(self, schedule, microbatches: list[dict[str, torch.Tensor]], *, forward_only: bool,
                  loss_for: Callable[[dict[str, Any]], Callable] = _lm_loss,
                  model: list[torch.nn.Module] | None = None) -> list:
        """One pass of a megatron-core schedule over this rank's micro batches (through `model`, the
        training chunks by default); the last stage's reports."""
        model = model or self.chunks
        # Every virtual stage walks the same micro batches (first stage reads tokens, last labels).
        data = [iter(microbatches) for _ in model] if len(model) > 1 else iter(microbatches)
        # Pipeline stages exchange [seq, batch, hidden] (megatron divides seq by cp itself); a packed
        # micro batch is one THD stream.
        packed = "cu_seqlens" in microbatches[0]
        seq_length = self.seq_length
        offload = self.offload_activations and not forward_only
        return schedule(forward_step_func=partial(_forward_step, self.device, loss_for, offload), data_iterator=data,
                        model=model,
                        num_microbatches=len(microbatches),
                        seq_length=seq_length * self.micro_batch_size if packed else seq_length,
                        micro_batch_size=1 if packed else self.micro_batch_size, forward_only=forward_only)

    def _global_loss(self, reports: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        totals = self._global_sums(reports, "lm loss", 2)
        return totals[0], totals[1]

    def _global_sums(self, reports: list[dict[str, torch.Tensor]], key: str, size: int) -> torch.Tensor:
        """The micro batches' `key` reports summed over the global batch, on every rank (collective)."""
        # Loss lives on the last pipeline stage; count it once per DP replica (TP rank 0) and
        # sum over the whole world so every rank, rank 0 included, knows the global loss.
        totals = torch.zeros(size, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            for report in reports:
                totals += report[key].to(totals)
        dist.all_reduce(totals)
        return totals

    def model_sharded_state_dict(self, part: str = "trained") -> dict[str, Any]:
        """'model' (or 'model0', 'model1', ... per virtual pipeline chunk) -> sharded state dict of the
        weights that train (under LoRA the adapters only; `part="base"`: the frozen rest)."""
        def select(state: dict[str, Any]) -> dict[str, Any]:
            if self.lora is None:
                return state
            return {k: v for k, v in state.items() if is_adapter(k) == (part == "trained")}

        if len(self.chunks) == 1:
            return {"model": select(self.chunks[0].module.sharded_state_dict())}
        return {f"model{i}": select(c.module.sharded_state_dict()) for i, c in enumerate(self.chunks)}

    def sharded_state_dict(self, is_loading: bool = False) -> dict[str, Any]:
        model = self.model_sharded_state_dict()
        optimizer = self.optimizer.sharded_state_dict(
            model, is_loading=is_loading,
            # Model-space optimizer state: loads into any TP/PP/DP layout. (0.16.1's default,
            # 'fully_sharded_model_space', fails to save without TE/apex; 'dp_reshardable'
            # cannot change TP/PP.)
            # No 'chained_<i>.' key prefix: the number of chained optimizers depends on the layout
            # (MoE under ep>1 adds one for expert params), the parameter names do not.
            metadata={"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True})
        return {**model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def _reference_sharded_state_dict(self) -> dict[str, Any]:
        """DPO's live reference chunks under keys of their own (REFERENCE_PREFIX + the model's)."""
        return {f"reference{i}": c.sharded_state_dict(prefix=REFERENCE_PREFIX)
                for i, c in enumerate(self.reference_chunks)}

    def save(self, directory: Path, step: int) -> None:
        """A dist checkpoint of model, optimizer, scheduler, step, layout, shape and RNG streams (and DPO's
        live reference, which a resume cannot rebuild from the trained weights)."""
        state = self.sharded_state_dict()
        state.update(step=step, layout=megatron_state.layout(), model_args=asdict(self.args),
                     rng_state=megatron_state.rng_state(is_loading=False))
        if self.reference_chunks:
            state.update(self._reference_sharded_state_dict(), **{LIVE_REFERENCE: True})
        dist_checkpointing.save(state, str(directory))
        if self.lora is not None and dist.get_rank() == 0:
            content = lora_checkpoint.reference(self.lora_base, directory, self.seed, self.lora, self.args,
                                                self.config.params_dtype)
            lora_checkpoint.write_reference(directory, content)

    def load(self, directory: Path) -> int:
        """Load a dist checkpoint saved in any layout; returns the step to resume after. A model-only
        checkpoint (no step) loads the weights and returns 0: fine-tuning starts fresh.
        Under LoRA a checkpoint without adapters is the frozen base (step 0); a LoRA checkpoint's
        base is loaded from its reference first (parallel/lora_checkpoint.py)."""
        if self.lora is not None:
            reference = lora_checkpoint.read_reference(directory)
            base = str(Path(directory).resolve()) if reference is None else reference["base"]
            if base is not None:
                self._load_model(dist_checkpointing.load(self.model_sharded_state_dict("base"), base), "base")
            self.lora_base = base
            if reference is None:
                return 0
        common = dist_checkpointing.load_common_state_dict(str(directory))
        if "step" not in common:
            # (the optimizer is left untouched: a never-stepped one cannot even describe its state)
            self._load_model(dist_checkpointing.load(self.model_sharded_state_dict(), str(directory)))
            return 0
        for chained in self.optimizer.chained_optimizers:
            # Without apex/TE the distributed optimizer's state_dict() asserts on a never-stepped
            # optimizer; give it states to overwrite.
            chained._init_optimizer_states_with_dummy_values()
        state = self.sharded_state_dict(is_loading=True)
        if self.reference_chunks:
            if not common.get(LIVE_REFERENCE):
                raise ValueError(f"{directory} holds no live DPO reference (it was saved with another "
                                 f"dpo.reference): resume it with that one")
            state.update(self._reference_sharded_state_dict())
        # RNG streams are per rank: restore them only into the layout that saved them.
        same_layout = megatron_state.saved_layout(common) == megatron_state.layout()
        if same_layout:
            state["rng_state"] = megatron_state.rng_state(is_loading=True)
        loaded = dist_checkpointing.load(state, str(directory))
        self._load_model(loaded)
        for i, reference in enumerate(self.reference_chunks):
            saved = loaded[f"reference{i}"]
            reference.load_state_dict({k[len(REFERENCE_PREFIX):]: v for k, v in saved.items()})
        # Non-tensor optimizer state (param groups: lr, wd, ... which the scheduler sets again every
        # step) is this layout's own; tensors (main params, Adam moments) come from the checkpoint.
        optimizer_state = (loaded["optimizer"] if same_layout
                           else megatron_state.own_structure(state["optimizer"], loaded["optimizer"]))
        # fp32 main params are views of the model params; the in-place copy must not record grads.
        with torch.no_grad():
            self.optimizer.load_state_dict(optimizer_state)
        step = int(common["step"])
        # torch AdamW's per-param `step` counter is not restored by megatron without apex/TE
        # (it comes back as one shared dummy tensor): set it from our own step count.
        for chained in self.optimizer.chained_optimizers:
            # (an offloaded optimizer steps its host copies: each sub-optimizer's step lives with its params)
            for inner in getattr(chained.optimizer, "sub_optimizers", [chained.optimizer]):
                fused = inner.defaults.get("fused")  # the fused kernel keeps `step` on the device
                for param, param_state in inner.state.items():
                    param_state["step"] = torch.tensor(float(step), device=param.device if fused else "cpu")
        change = load_schedule(self.scheduler, loaded["scheduler"])
        if change and dist.get_rank() == 0:
            print(change, flush=True)
        if same_layout:
            megatron_state.set_rng_state(loaded["rng_state"])
        elif dist.get_rank() == 0:
            print(f"checkpoint: layout changed {megatron_state.saved_layout(common)} -> {megatron_state.layout()}: "
                  f"weights and optimizer state resharded, RNG streams start fresh", flush=True)
        return step

    def _load_model(self, loaded: dict[str, Any], part: str = "trained") -> None:
        for key, value in loaded.items():
            # 'model' -> chunk 0, 'model3' -> chunk 3 (virtual pipeline chunks); other keys are not the model's
            index = 0 if key == "model" else int(key[5:]) if key.startswith("model") and key[5:].isdigit() else None
            if index is not None:
                module = self.chunks[index].module
                if self.lora is None:
                    module.load_state_dict(value)
                    continue
                # the base and the adapters come from different checkpoints: each load fills its part
                missing, unexpected = module.load_state_dict(value, strict=False)
                left = [k for k in missing if not k.endswith("._extra_state") and is_adapter(k) == (part == "trained")]
                if left or unexpected:
                    raise RuntimeError(f"checkpoint: model tensors missing {left[:3]} / unexpected {unexpected[:3]}")

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Every model tensor whole, by checkpoint key, on every rank (collective; the whole model
        is assembled on each rank's CPU)."""
        return megatron_state.gather_full(megatron_state.model_pieces([c.module for c in self.chunks]))
