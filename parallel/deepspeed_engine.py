"""The DeepSpeed ZeRO-3 engine (`parallel.engine=deepspeed`), optionally offloading to CPU / NVMe.

The model is the same megatron-core GPTModel the megatron engine trains (pipeline size 1;
tensor parallel through megatron-core's own TP layers, `parallel.tp`), built inside
`deepspeed.zero.Init`, so every parameter (each TP rank's slice) is partitioned over its
data-parallel group as it is created and the whole model never exists on one rank. Initial weights come from `models.init` (same seed ⇒ same weights as the
megatron engine). One `train_step` follows the megatron engine's semantics:

- loss = sum of token losses over the *global* batch / its number of loss tokens
  (each micro batch's summed loss is pre-scaled so that DeepSpeed's division by the
  gradient-accumulation steps and its DP averaging leave exactly that gradient);
- gradients clipped by their global norm (`optim.clip_grad`), the pre-clip norm reported;
- lr/weight decay from megatron's OptimizerParamScheduler (warmup + cosine, conf/optim),
  no weight decay on biases and 1-D weights (megatron's default param groups);
- AdamW: DeepSpeedCPUAdam when the optimizer state is offloaded, DeepSpeed's FusedAdam on
  GPU, torch AdamW on CPU otherwise.

A preference objective (parallel/preference_loss.py) takes the megatron engine's loss function
per micro batch, pre-scaled by the global batch's pair count instead of its loss tokens, and
`sequence_logps` gives DPO's precomputed reference pass its forward. DPO's live reference is a
second ZeRO-3 model without optimizer, partitioned like the trained one, whose partitions take the
trained model's at the start (`freeze_reference`) and are saved beside DeepSpeed's files, one file
per rank (REFERENCE_FILE).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from models.args import ModelArgs
from models.init import local_init, local_tensors
from models.kernel_provider import KernelOptions
from models.llama import build_llama, transformer_config
from parallel.engine_config import OptimConfig, ZeroConfig
from parallel.layout import Layout
from parallel.lr_schedule import load_schedule, lr_scheduler
from parallel.pinned_memory import release_cached_pinned_blocks
from parallel import megatron_state
from parallel.engine import StepResult, prepare_batch
from parallel.preference_loss import (PREFERENCE_METRICS, REPORT_KEY, ObjectiveConfig, logps_loss_func,
                                      preference_loss_func)

# In a checkpoint directory written by this engine (beside DeepSpeed's own ZeRO-3 files):
# {"format": "deepspeed_zero3", "step", "layout", "model_args"}.
ZERO_META = "shardforge_zero.json"
# In such a directory, when the run holds DPO's live reference: each rank's partitions of it.
REFERENCE_FILE = "reference_rank{rank:05d}.pt"


def zero_meta(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of a ZeRO-3 checkpoint directory; None for any other (e.g. a dist checkpoint)."""
    path = Path(directory) / ZERO_META
    return json.loads(path.read_text()) if path.is_file() else None


def import_deepspeed(device: torch.device):
    """`import deepspeed` with its accelerator chosen from our device (it must be set before
    the first import: DeepSpeed otherwise guesses, and on a CPU-only host the guess is cpu anyway)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else "cuda")
    import deepspeed

    if dist.is_initialized():  # adopt our process group (deepspeed.comm otherwise sees a world of one)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    return deepspeed


def deepspeed_config(zero: ZeroConfig, *, micro_batch_size: int, grad_accum: int, dp: int, clip_grad: float,
                     bf16: bool, pin_memory: bool) -> dict[str, Any]:
    """The DeepSpeed config dict of `parallel.zero.*` (ZeRO stage 3)."""
    stage3: dict[str, Any] = {"stage": 3, "contiguous_gradients": True, "overlap_comm": False}
    for target, ds_key in ((zero.offload_params, "offload_param"), (zero.offload_optimizer, "offload_optimizer")):
        if target != "none":
            stage3[ds_key] = {"device": target, "pin_memory": pin_memory}
            if target == "nvme":
                stage3[ds_key]["nvme_path"] = zero.nvme_path
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp,
        "gradient_clipping": clip_grad,
        "bf16": {"enabled": bf16},
        "zero_optimization": stage3,
        "steps_per_print": 2**62,  # our metrics.jsonl reports steps; keep DeepSpeed's log quiet
        "wall_clock_breakdown": False,
    }


def _param_groups(named: list[tuple[str, torch.nn.Parameter]], lr: float, min_lr: float) -> list[dict[str, Any]]:
    """megatron's default groups: no weight decay on biases and 1-D parameters (norms).
    ZeRO-3 parameters are empty outside a gather: their real shape is `ds_shape`."""
    decay, no_decay = [], []
    for name, p in named:
        shape = getattr(p, "ds_shape", p.shape)
        (no_decay if name.endswith(".bias") or len(shape) == 1 else decay).append(p)
    common = {"lr_mult": 1.0, "max_lr": lr, "min_lr": min_lr}
    return [g for g in ({"params": decay, "wd_mult": 1.0, **common},
                        {"params": no_decay, "wd_mult": 0.0, **common}) if g["params"]]


def _slice_plan(twin: torch.nn.Module) -> dict[str, list]:
    """Parameter name -> the ShardedTensors (checkpoint key, global offsets) that make it up.

    Partitioned ZeRO-3 parameters hold no data, so this is read from `twin`, the same model
    built on the meta device (`sh.data` are meta tensors: only their shape/strides are used).
    """
    twin_names = {id(p): name for name, p in twin.named_parameters()}
    plan: dict[str, list] = {}
    for sh in local_tensors(twin):
        base = sh.data if id(sh.data) in twin_names else sh.data._base  # a view (e.g. one half of fc1)
        if base is not None and id(base) in twin_names:
            plan.setdefault(twin_names[id(base)], []).append(sh)
    missing = [name for name in twin_names.values() if name not in plan]
    if missing:
        raise RuntimeError(f"parameters without a sharded_state_dict entry: {missing}")
    return plan


def _view(param: torch.Tensor, sh) -> torch.Tensor:
    """The part of a gathered parameter that `sh` (from the meta twin) describes."""
    return param.data.as_strided(sh.data.size(), sh.data.stride(), sh.data.storage_offset())


@torch.no_grad()
def _fill_partitioned(deepspeed, named: list[tuple[str, torch.nn.Parameter]], plan: dict[str, list], values) -> None:
    """Gather `named` (all ranks), let DP rank 0 write `values(sh)` into each slice (its TP rank's
    slices), re-partition (modifier_rank=0: DP rank 0's values, broadcast over its DP group)."""
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
        if ps.get_data_parallel_rank() == 0:
            for name, p in named:
                for sh in plan[name]:
                    _view(p, sh).copy_(values(sh))


class _MegatronMPU:
    """megatron-core's parallel_state in the `mpu` shape DeepSpeed asks for: its "model parallel"
    is our tensor parallel (pp=1), its data parallel our DP groups."""
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)


class DeepSpeedEngine:
    """The `parallel.engine.Engine` contract over DeepSpeed ZeRO-3, plus `logits` for evaluation.
    Its checkpoints are DeepSpeed's own per-rank partition files (`save`); `load` also takes a
    megatron (dist_checkpointing) checkpoint's weights, for a fresh start from them."""

    def __init__(self, args: ModelArgs, layout: Layout, optim: OptimConfig, zero: ZeroConfig, *, steps: int,
                 seq_length: int,
                 micro_batch_size: int, global_batch_size: int, seed: int, device: torch.device,
                 params_dtype: torch.dtype, recompute: str | list[str] | None, backend: str,
                 keep_saved_schedule: bool = False, objective: ObjectiveConfig = ObjectiveConfig()):
        deepspeed = import_deepspeed(device)
        self.args, self.device, self.dp, self.layout, self.objective = args, device, layout.dp, layout, objective
        self.grad_accum = global_batch_size // (micro_batch_size * self.dp)
        offload_optimizer = zero.offload_optimizer != "none"
        self.ds_config = deepspeed_config(zero, micro_batch_size=micro_batch_size, grad_accum=self.grad_accum,
                                          dp=self.dp, clip_grad=optim.clip_grad,
                                          bf16=params_dtype == torch.bfloat16, pin_memory=device.type == "cuda")
        # megatron-core's own tensor-parallel layers (parallel_state's TP groups); ZeRO-3 shards
        # each TP rank's slices over its DP group.
        self.tp = ps.get_tensor_model_parallel_world_size()
        config = transformer_config(args, tp=self.tp, pp=1, vpp=None, params_dtype=params_dtype,
                                    on_cpu=device.type == "cpu", recompute=recompute)
        kernels = KernelOptions(device=device.type, backend=backend, engine="deepspeed")
        build = dict(options=kernels, pre_process=True, post_process=True)
        with torch.device("meta"):  # shapes and checkpoint keys only: the init plan
            twin = build_llama(args, config, **build)
        # Each module's parameters are partitioned over DP as soon as the module is built.
        # dtype comes from the config's bf16 flag: an explicit dtype= is ignored on accelerators
        # without fp16 (DeepSpeed 0.19 `_set_dtype` precedence bug: the CPU one got bf16 weights).
        # zero.Init reads LOCAL_RANK, which only torchrun sets: a plain single-process run has none.
        os.environ.setdefault("LOCAL_RANK", "0")
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, mpu=_MegatronMPU,
                                 data_parallel_group=ps.get_data_parallel_group()):  # not taken from mpu
            model = build_llama(args, config, **build)
        self._plan = _slice_plan(twin)
        del twin
        # models.init's weights, one module's parameters gathered at a time, drawn on the engine's
        # device as the megatron engine draws them (CPU and CUDA generators differ)
        init = partial(local_init, seed=seed, std=args.init_method_std, num_layers=args.num_layers, device=device)
        for prefix, module in model.named_modules():
            named = list(module.named_parameters(prefix=prefix, recurse=False))
            if named:
                _fill_partitioned(deepspeed, named, self._plan, init)
        self._deepspeed = deepspeed

        groups = _param_groups(list(model.named_parameters()), optim.lr, optim.min_lr)
        adam = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay)
        if offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # C++ op, JIT-built with ninja on first use

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)
        elif device.type == "cuda":
            from deepspeed.ops.adam import FusedAdam

            optimizer = FusedAdam(groups, adam_w_mode=True, **adam)
        else:
            optimizer = torch.optim.AdamW(groups, **adam)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                  config=self.ds_config, mpu=_MegatronMPU)
        release_cached_pinned_blocks(device)  # pinned staging copies DeepSpeed's set-up dropped
        self.reference = None  # DPO's live reference: the same model frozen, forward only
        if objective.live_reference:
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config, mpu=_MegatronMPU,
                                     data_parallel_group=ps.get_data_parallel_group()):
                frozen = build_llama(args, config, **build)
            frozen.requires_grad_(False)
            self.reference, *_ = deepspeed.initialize(model=frozen, config=self.ds_config, mpu=_MegatronMPU)
            self.reference.eval()
        # megatron's own scheduler on DeepSpeed's param groups: the same lr/wd per step as the megatron engine.
        self.scheduler = lr_scheduler(self.optimizer, optim, steps, keep_saved_schedule)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def num_parameters(self) -> int:
        """Parameter elements held by this rank (its ZeRO-3 partition)."""
        return sum(p.ds_tensor.numel() for p in self.module.parameters())

    def _token_losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Masked per-token losses of one micro batch (the megatron engine's forward step), and the
        micro batch on the device."""
        batch, packed = prepare_batch(batch, self.device)
        losses = self.engine(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                             packed_seq_params=packed)
        return losses.float() * batch["loss_mask"], batch

    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._token_losses(batch)[0]

    def train_step(self, microbatches: list[dict[str, torch.Tensor]]) -> StepResult:
        if len(microbatches) != self.grad_accum:
            raise ValueError(f"expected {self.grad_accum} micro batches per step, got {len(microbatches)}")
        if self.objective.preference:
            return self._preference_step(microbatches)
        # Loss tokens of the whole global batch, known before any backward: every micro batch's
        # gradient is scaled by it, as megatron's calculate_per_token_loss does after the fact.
        counts = torch.tensor([float(sum(mb["loss_mask"].sum() for mb in microbatches))], dtype=torch.float64,
                              device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(counts, group=ps.get_data_parallel_group())  # TP ranks see the same batches
        num_tokens = int(counts.item())
        # DeepSpeed divides each backward by grad_accum and averages gradients over dp.
        scale = self.grad_accum * self.dp / max(num_tokens, 1)
        self.scheduler.step(increment=1)  # sets this step's lr before the optimizer runs
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        for batch in microbatches:
            total = self._forward(batch).sum()
            loss_sum += total.detach().to(loss_sum)
            self.engine.backward(total * scale)
            self.engine.step()  # an optimizer step only at the accumulation boundary
        dist.all_reduce(loss_sum, group=ps.get_data_parallel_group())
        grad_norm = self.engine.get_global_grad_norm()
        values = torch.tensor([loss_sum.item(), num_tokens, float(grad_norm if grad_norm is not None else 0.0)],
                              dtype=torch.float64)
        return StepResult(values, lr=self.optimizer.param_groups[0]["lr"])

    def _preference_step(self, microbatches: list[dict[str, Any]]) -> StepResult:
        """One step of a preference objective: each micro batch's loss total (parallel/preference_loss.py)
        pre-scaled by its global batch's pair count P, which every micro batch carries."""
        scale = self.grad_accum * self.dp / int(microbatches[0]["pairs_global"])
        if self.reference is not None:
            microbatches = self._with_live_reference(microbatches)
        self.scheduler.step(increment=1)
        # loss total, pairs, then the PREFERENCE_METRICS sums
        sums = torch.zeros(2 + len(PREFERENCE_METRICS), dtype=torch.float64, device=self.device)
        for batch in microbatches:
            losses, on_device = self._token_losses(batch)
            total, pairs, report = preference_loss_func(self.objective, on_device, losses)
            sums += torch.cat([total.detach().reshape(1), pairs.reshape(1).to(total), report[REPORT_KEY]]).to(sums)
            self.engine.backward(total * scale)
            self.engine.step()
        dist.all_reduce(sums, group=ps.get_data_parallel_group())  # TP ranks hold the same sums
        grad_norm = self.engine.get_global_grad_norm()
        norm = torch.full((1,), float(grad_norm if grad_norm is not None else 0.0), dtype=torch.float64,
                          device=sums.device)
        values = torch.cat([sums[:2], norm, sums[2:] / sums[1]])
        return StepResult(values, lr=self.optimizer.param_groups[0]["lr"], metric_names=PREFERENCE_METRICS)

    def _reference_partitions(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(live reference's, trained model's) local partition of each parameter, in the same order."""
        return [(r.ds_tensor, p.ds_tensor) for r, p in zip(self.reference.module.parameters(), self.module.parameters())]

    @torch.no_grad()
    def freeze_reference(self) -> None:
        """DPO's live reference takes the trained model's current weights (a run's initial weights: call it
        once the starting checkpoint is loaded); each rank copies its own partitions."""
        for reference, trained in self._reference_partitions():
            reference.copy_(trained)

    @torch.no_grad()
    def _with_live_reference(self, microbatches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The micro batches with the frozen reference's summed log-probs per sequence (`reference_logps`)."""
        out = []
        for batch in microbatches:
            on_device, packed = prepare_batch(batch, self.device)
            losses = self.reference(on_device["tokens"], on_device["position_ids"], None, labels=on_device["labels"],
                                    packed_seq_params=packed).float() * on_device["loss_mask"]
            out.append({**batch, "reference_logps": logps_loss_func(on_device, losses)[2]["logps"]})
        return out

    @torch.no_grad()
    def sequence_logps(self, microbatches: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """Forward only, in eval mode: each sequence's summed target log-probs, micro batches in order
        (every rank calls it: ZeRO-3 gathers are collective)."""
        self.engine.eval()
        try:
            logps = [logps_loss_func(batch, losses)[2]["logps"]
                     for losses, batch in map(self._token_losses, microbatches)]
        finally:
            self.engine.train()
        return torch.cat(logps)

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """The training forward's token losses (a preference objective's loss totals and pairs) without
        backward or step, in eval mode, summed over the DP group (TP ranks hold the same sums)."""
        if self.reference is not None:
            microbatches = self._with_live_reference(microbatches)
        self.engine.eval()
        try:
            totals = torch.zeros(2, dtype=torch.float64, device=self.device)
            for batch in microbatches:
                if self.objective.preference:  # (loss total, pairs) as the training step counts them
                    losses, on_device = self._token_losses(batch)
                    total, pairs, _ = preference_loss_func(self.objective, on_device, losses)
                    totals += torch.stack([total.detach().to(totals), pairs.to(totals)])
                    continue
                totals[0] += self._forward(batch).sum().to(totals)
                totals[1] += float(batch["loss_mask"].sum())
        finally:
            self.engine.train()
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        loss_sum, num_tokens = totals.tolist()
        return loss_sum, int(num_tokens)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary logits [batch, seq, vocab] (parameters gathered layer by layer); every
        rank must call it (ZeRO-3 gathers are collective)."""
        tokens = tokens.to(self.device)
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        logits = self.engine(tokens, position_ids, None)
        if self.tp > 1:  # each TP rank holds a slice of the vocabulary
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            logits = gather_from_tensor_model_parallel_region(logits)
        return logits

    # -- state I/O: launcher.checkpoint owns directories, `latest` and atomicity ---------------------

    def save(self, directory: Path, step: int) -> None:
        """The ZeRO-3 checkpoint (every rank its partition) and its metadata into `directory`."""
        client = {"scheduler": self.scheduler.state_dict(), "step": step}
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, client_state=client, save_latest=False)
        if dist.get_rank() == 0:
            meta = {"format": "deepspeed_zero3", "step": step, "layout": megatron_state.layout(),
                    "model_args": asdict(self.args)}
            (directory / ZERO_META).write_text(json.dumps(meta, indent=1))
        if self.reference is not None:
            torch.save([r.detach().cpu() for r, _ in self._reference_partitions()],
                       directory / REFERENCE_FILE.format(rank=dist.get_rank()))

    def load(self, directory: Path) -> int:
        """A ZeRO-3 checkpoint of this engine (in the layout that saved it: partitions load only into
        the same tp x dp, which launcher.checkpoint.check_engine says first) -> its step; a megatron
        checkpoint -> its weights, a fresh start (0)."""
        if zero_meta(directory) is None:
            self._load_model_weights(directory)
            return 0
        _, client = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if client is None:
            raise FileNotFoundError(f"{directory}: DeepSpeed found no checkpoint to load")
        change = load_schedule(self.scheduler, client["scheduler"])
        if change and dist.get_rank() == 0:
            print(change, flush=True)
        if self.reference is not None:
            path = directory / REFERENCE_FILE.format(rank=dist.get_rank())
            if not path.is_file():
                raise ValueError(f"{directory} holds no live DPO reference (it was saved with another "
                                 f"dpo.reference): resume it with that one")
            with torch.no_grad():
                for (reference, _), saved in zip(self._reference_partitions(), torch.load(path)):
                    reference.copy_(saved)
        return int(client["step"])

    def _load_model_weights(self, directory: Path) -> None:
        """The model weights of a megatron (dist_checkpointing) checkpoint: a training checkpoint of
        any layout, an HF import, a zero_to_megatron conversion. One checkpoint key (e.g. every
        layer's fc1) is read at a time, by every rank (dist_checkpointing loads collectively)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        params = dict(self.module.named_parameters())
        by_key: dict[str, list[str]] = {}
        for name, shards in self._plan.items():
            for sh in shards:
                by_key.setdefault(sh.key, []).append(name)
        meta = dist_checkpointing.load_tensors_metadata(str(directory))
        for key, names in by_key.items():
            if key not in meta:
                raise ValueError(f"{directory} has no tensor {key}: not a checkpoint of this model")
            request = {key: ShardedTensor.from_rank_offsets(
                key, torch.empty(tuple(meta[key].global_shape), dtype=meta[key].dtype),
                replica_id=dist.get_rank())}
            full = dist_checkpointing.load(request, str(directory))[key]

            def values(sh, full=full):
                return full[tuple(slice(o, o + n) for o, n in zip(sh.global_offset, (1,) * sh.prepend_axis_num
                                                                  + tuple(sh.local_shape)))].reshape(sh.local_shape)

            named = [(n, params[n]) for n in dict.fromkeys(names)]
            _fill_partitioned(self._deepspeed, named, {n: [sh for sh in self._plan[n] if sh.key == key]
                                                       for n, _ in named}, values)
            del full
        # The optimizer's fp32 master partitions were copied from the initial weights by
        # deepspeed.initialize: without this its first step would write those back.
        self.optimizer.refresh_fp32_params()

    @torch.no_grad()
    def export_weights(self) -> dict[str, torch.Tensor]:
        """Every model tensor whole, by checkpoint key, on every rank (collective; parameters are
        gathered one module at a time, the whole model is assembled on each rank's CPU)."""
        pieces = []
        for prefix, module in self.module.named_modules():
            named = list(module.named_parameters(prefix=prefix, recurse=False))
            if not named:
                continue
            with self._deepspeed.zero.GatheredParameters([p for _, p in named]):
                # the twin's ShardedTensors carry this rank's TP offsets and replica ids
                pieces += [(sh, _view(p, sh).detach().cpu().clone()) for name, p in named for sh in self._plan[name]]
        return megatron_state.gather_full(pieces)
