"""The train config's schema: one frozen dataclass per section, registered in Hydra's ConfigStore.

Hydra stays the front end: conf/config.yaml's defaults list starts from `schema: job` (and
conf/submit.yaml's from `schema: submit`), so every key has a type and a default here, the YAML
groups (conf/<group>/<option>.yaml) hold only what an option sets, and an override of a key that
is not here is an error. An option of a group whose options differ in their keys (data, cluster)
names its schema (`schema/data/*`, `schema/cluster/*`) in its own defaults list.

OmegaConf makes the node of a frozen dataclass read-only; the nodes stored here are writable, so
Hydra can merge the YAML and the overrides into them, and `OmegaConf.to_object` still builds the
frozen dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from models.args import ModelArgs
from parallel.engine_config import OptimConfig, ZeroConfig


@dataclass(frozen=True)
class ModelConfig(ModelArgs):
    """The shape of a Llama-family model (conf/model/*.yaml): the fields of models.args.ModelArgs,
    with their defaults and comments there; a model YAML holds only what differs from them."""
    moe_layer_freq: Any = 1           # every N-th layer is MoE, or a 0/1 list with one entry per layer


@dataclass(frozen=True)
class ParallelConfig:
    engine: str = "megatron"          # megatron | deepspeed (ZeRO-3 over DP x megatron TP, pp=1; see zero)
    tp: int = 1                       # tensor parallel
    pp: int = 1                       # pipeline parallel
    vpp: int | None = None            # virtual stages per pipeline rank (interleaved 1F1B); null = off
    cp: int = 1                       # context parallel: each row's sequence split over cp ranks (megatron engine)
    # cp > 1: how attention reaches the other ranks' keys: ring (K/V blocks passed around the CP
    # group, memory ∝ sequence / cp) | allgather (the whole K/V gathered, memory ∝ sequence)
    cp_mode: str = "ring"
    ep: int = 1                       # expert parallel (MoE models)
    dp: int | None = None             # data parallel; null = world_size / (tp * pp * cp)
    distributed_optimizer: bool = True  # ZeRO-1 style optimizer-state sharding over DP
    overlap_grad_reduce: bool = False  # DP gradient all-reduce overlapped with the backward
    zero: ZeroConfig = field(default_factory=ZeroConfig)


@dataclass(frozen=True)
class DataConfig:
    """What every data source (conf/data/*.yaml) takes; each option adds its own keys."""
    name: str = MISSING               # the option: stdlib_docs | indexed
    weights: list[float] | None = None  # blend weights, one per prefix; null = equal
    format: str = "pretrain"          # pretrain | sft (assistant-only loss; needs <prefix>.mask.bin)
    packing: bool = False             # pack whole samples into seq_length rows (cu_seqlens, padding-free attention)
    packing_algorithm: str = "bfd"    # bfd (best-fit decreasing) | greedy (first fit, in order)
    reset_position_ids: bool = False  # pretrain windows: positions restart after each EOD (Megatron semantics)
    reset_attention_mask: bool = False  # pretrain windows: no attention across EOD
    eod_mask_loss: bool = False       # pretrain windows: no loss on EOD tokens
    blend_block: int = 1000           # samples per block of the blend's interleaving
    # held-out documents, Megatron-style: train,valid[,test] weights ("98/2", or "98,2" quoted), each
    # dataset's documents cut into contiguous ranges in that proportion (launcher/data/split.py);
    # null = train on every document
    split: str | None = None
    valid_prefixes: list[str] | None = None  # separate validation datasets (same tokenizer); instead of split


@dataclass(frozen=True)
class StdlibDocsData(DataConfig):
    """data=stdlib_docs: the embedded corpus, built at first use and cached as an indexed dataset."""
    cache_dir: str = MISSING          # where the corpus, its tokens and the tokenizer are kept
    tokenizer_vocab_size: int = MISSING  # the sentencepiece model trained on the corpus
    max_corpus_bytes: int = MISSING   # docstring text taken from the standard library


@dataclass(frozen=True)
class IndexedData(DataConfig):
    """data=indexed: preprocessed datasets (`python -m launcher.preprocess`), <prefix>.bin/.idx."""
    prefixes: list[str] = MISSING     # one or more dataset prefixes
    tokenizer: str = MISSING          # the tokenizer the data was preprocessed with (.model, tokenizer.json or its dir)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200                  # optimizer steps of the whole run
    micro_batch_size: int = 4         # rows per forward/backward on one DP rank
    global_batch_size: int = 8        # rows per optimizer step over all DP ranks (the rest is gradient accumulation)
    seq_length: int = 256             # tokens per row
    seed: int = 1234                  # weights, data order and dropout
    precision: str = "auto"           # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 | fp8 (bf16 with fp8 GEMMs)
    # null | selective (core attention) | full | a module list, e.g. [mlp,layernorm] or [mlp_act,layernorm]
    recompute: Any = None
    # auto | true | false: replay forward+backward as one CUDA graph (CUDA, megatron, unpacked,
    # pp=1, MoE on the fused dispatch; auto: one process)
    cuda_graph: Any = "auto"
    # the tensors the forward saves for the backward (with recompute=full: each layer's input)
    # held in host memory, pinned, until the backward needs them (engine=megatron)
    offload_activations: bool = False
    compile: bool = False             # torch.compile each transformer layer (engine=megatron, dense models)
    # MoE layers on CUDA (engine=megatron, torch backend): megatron (its MoELayer and token dispatcher)
    # | fused: permute, grouped GEMMs and combine without host synchronization where one rank holds
    # every expert (models/fused_moe.py)
    moe_dispatch: str = "fused"
    # the dense core attention's SDPA kernel on CUDA (as Megatron-LM's --attention-backend): auto
    # (torch's dispatch order) | cudnn | flash (that kernel only: an input it cannot take is an error)
    attention_backend: str = "auto"
    log_every: int = 1                # metrics.jsonl gets every N-th step (and the last)
    # lm: next-token cross entropy (pretrain, SFT) | dpo | simpo | orpo: a preference loss over
    # preference pairs (models/objectives.py), refused by validation while no engine runs it
    objective: str = "lm"
    # none: every parameter trains | lora: the base model frozen, low-rank adapters on lora.targets
    # train (the lora section; megatron engine, dense models)
    peft: str = "none"


@dataclass(frozen=True)
class LoraConfig:
    """train.peft=lora: W + (alpha / rank) * B @ A on each targeted linear, W frozen, B starting at zero."""
    rank: int = 16                   # inner dimension of the adapters
    alpha: float = 32.0               # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0              # dropout on the adapters' input (training only)
    # qkv (fused query/key/value) | proj (attention output) | fc1 (fused gate/up) | fc2 (MLP output)
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    # QLoRA-style memory saving: the adapted linears' frozen weights held in fp8 (e4m3, a scale per
    # output row) and dequantised in each GEMM; the adapters train against that quantised base
    base_fp8: bool = False


@dataclass(frozen=True)
class DPOConfig:
    """train.objective=dpo: Direct Preference Optimization against a frozen reference model (the initial weights)."""
    beta: float = 0.1                 # how strongly the policy is held to the reference (loss=ipo: IPO's tau)
    loss: str = "sigmoid"             # sigmoid (DPO) | robust (robust DPO) | hinge (SLiC) | ipo
    # sigmoid, robust: the probability that a preference label is flipped, in [0, 0.5)
    # (sigmoid with it is conservative DPO)
    label_smoothing: float = 0.0
    sft_weight: float = 0.0           # weight of the chosen responses' NLL added to the loss (RPO); 0 = off
    # precomputed: the reference's log-probs from one pass over the data with the initial weights,
    # stored beside the dataset | live: a frozen copy of the model held alongside
    reference: str = "precomputed"


@dataclass(frozen=True)
class SimPOConfig:
    """train.objective=simpo: reference-free, length-normalised preference loss."""
    beta: float = 2.0                 # scale of the per-token mean log-prob margin
    gamma: float = 1.0                # target reward margin
    label_smoothing: float = 0.0      # the probability that a preference label is flipped, in [0, 0.5)
    sft_weight: float = 0.0           # weight of the chosen responses' NLL added to the loss (CPO-SimPO); 0 = off


@dataclass(frozen=True)
class ORPOConfig:
    """train.objective=orpo: NLL of the chosen response plus an odds-ratio preference term, reference-free."""
    beta: float = 0.1                 # weight of the odds-ratio term (the paper's lambda)
    # the tokens the NLL term covers: response (the targets) | sequence (prompt and response, as TRL's ORPOTrainer)
    nll: str = "response"


@dataclass(frozen=True)
class EvalConfig:
    """Validation loss on the held-out data (data.split or data.valid_prefixes)."""
    every: int = 0                    # evaluate every N optimizer steps; 0 = only at the end (eval.at_end)
    iters: int = 10                   # batches of train.global_batch_size rows per evaluation (the same ones each time)
    at_end: bool = True               # evaluate after the last step when validation data is given


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "${run.dir}/checkpoints"  # where this run saves (iter_*/ and `latest`)
    save_every: int = 0               # 0 = only at the end of training
    # auto: resume from checkpoint.dir's `latest` when there is one, else start fresh; or a
    # checkpoint dir (its `latest`) or one iter_* dir to start from; null: start fresh
    load: str | None = "auto"
    # false: a resumed run follows this config's lr schedule (train.steps, optim.lr, min_lr,
    # warmup_steps, decay_style) from the resumed step; true: the checkpoint's saved schedule
    keep_saved_schedule: bool = False
    final_save: bool = True           # save once more when training ends
    keep_last: int | None = None      # keep only the newest N checkpoints (pruned after a new one is complete)


@dataclass(frozen=True)
class WandbConfig:
    mode: str = "offline"             # offline | online | disabled
    project: str = "shardforge"
    name: str | None = None           # the wandb run name; null = wandb picks one


@dataclass(frozen=True)
class LoggingConfig:
    progress: bool = True             # live progress line on rank 0
    # also the libraries' console chatter: megatron-core's config dumps and parameter lists,
    # deprecation warnings (launcher/console.py)
    verbose: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False         # also write TensorBoard events into <run.dir>
    profile_steps: list[int] | None = None  # [start, end]: torch.profiler over those steps -> <run.dir>/profile/
    # N (CUDA): allocator history from start-up to step N -> <run.dir>/memory/
    memory_snapshot: int | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """cluster=local: no scheduler, `python -m launcher.train` / torchrun on this host."""
    name: str = MISSING


@dataclass(frozen=True)
class SlurmCluster(ClusterConfig):
    """A Slurm cluster for `python -m launcher.submit` (conf/cluster/slurm.yaml and copies of it)."""
    nodes: int = 1                    # nodes of the job (world size = nodes x processes per node)
    gpus_per_node: int = 8            # GPUs (and so processes) per node; 0 = a CPU-only job
    procs_per_node: int | None = None  # training processes per node; null = gpus_per_node, or 1 when it is 0
    cpus_per_task: int | None = None  # --cpus-per-task (torchrun launcher: one task per node; srun: one per GPU)
    partition: str | None = None      # --partition; required when the cluster has no default partition
    partition_required: Any = "auto"  # auto (ask sinfo for a default partition) | true | false
    account: str | None = None        # --account
    qos: str | None = None            # --qos
    time: str | None = "04:00:00"     # --time; the requeue signal arrives signal_grace_s before it ends
    mem: str | None = None            # --mem, e.g. 0 (all of the node) or 500G
    constraint: str | None = None     # --constraint (node features)
    exclusive: bool = True            # --exclusive: whole nodes
    job_name: str | None = None       # null = the run dir's name
    launcher: str = "torchrun"        # torchrun (one per node, c10d rendezvous) | srun (one task per process)
    rdzv_port_base: int = 29500       # rendezvous/master port = base + job id % 20000 (same for a requeued job)
    requeue: bool = True              # on the time-limit signal: save, then `scontrol requeue` the job
    signal_grace_s: int = 180         # USR1 reaches the job this long before its time limit: save, requeue
    max_restarts: int = 20            # stop requeueing after SLURM_RESTART_COUNT reaches this
    python: str | None = None         # interpreter on the nodes; null = the one running launcher.submit
    sbatch: str = "sbatch"            # the sbatch command (sinfo/scontrol are looked up next to it)
    sbatch_extra: list[str] = field(default_factory=list)  # more "#SBATCH ..." lines
    setup: list[str] = field(default_factory=list)  # shell lines run first on the batch node (modules, venv)
    # exported for every rank; the network env of a fabric goes here too (NCCL_SOCKET_IFNAME, ...)
    env: dict[str, str] = field(default_factory=lambda: {
        "OMP_NUM_THREADS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"})


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/${model.name}"   # metrics.jsonl, checkpoints and the resolved config live here
    # true: a fresh start into a run.dir that holds a run moves that run's results (and checkpoint.dir)
    # aside to <run.dir>.<timestamp> instead of refusing; nothing is deleted
    overwrite: bool = False


@dataclass(frozen=True)
class JobConfig:
    """`python -m launcher.train`: the whole config (conf/config.yaml)."""
    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    simpo: SimPOConfig = field(default_factory=SimPOConfig)
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = MISSING
    device: str = "auto"              # auto | cpu | cuda
    run: RunConfig = field(default_factory=RunConfig)


@dataclass(frozen=True)
class SubmitOptions:
    dry_run: bool = False             # true: validate and print the rendered sbatch script, submit nothing


@dataclass(frozen=True)
class SubmitJobConfig(JobConfig):
    """`python -m launcher.submit`: the training config plus what only the submitter reads (conf/submit.yaml)."""
    submit: SubmitOptions = field(default_factory=SubmitOptions)


@dataclass(frozen=True)
class EvaluateOptions:
    output: str | None = None         # also write the eval record (JSON) to this file


@dataclass(frozen=True)
class EvaluateLoraConfig:
    """launcher.evaluate's lora keys, unset (null) by default: a LoRA checkpoint's own (its lora.json),
    or LoraConfig's defaults for any other checkpoint (launcher.evaluate.with_adapter_settings)."""
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: list[str] | None = None
    base_fp8: bool | None = None


@dataclass(frozen=True)
class EvaluateJobConfig(JobConfig):
    """`python -m launcher.evaluate`: the training config plus what only the evaluator reads (conf/evaluate.yaml)."""
    lora: EvaluateLoraConfig = field(default_factory=EvaluateLoraConfig)  # type: ignore[assignment]
    evaluate: EvaluateOptions = field(default_factory=EvaluateOptions)


def _writable(schema: type) -> DictConfig:
    """The schema as a config node Hydra can merge into (see the module docstring)."""
    node = OmegaConf.structured(schema)

    def clear(n: Any) -> None:
        n._set_flag("readonly", None)
        if isinstance(n, DictConfig):
            for key in n.keys():
                clear(n._get_node(key))
        elif isinstance(n, ListConfig):
            for i in range(len(n)):
                clear(n._get_node(i))

    clear(node)
    return node


def register() -> None:
    """Store the schemas under the names the YAML defaults lists use (storing again replaces)."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="job", node=_writable(JobConfig), package="_global_")
    cs.store(group="schema", name="submit", node=_writable(SubmitJobConfig), package="_global_")
    cs.store(group="schema", name="evaluate", node=_writable(EvaluateJobConfig), package="_global_")
    cs.store(group="schema/data", name="stdlib_docs", node=_writable(StdlibDocsData))
    cs.store(group="schema/data", name="indexed", node=_writable(IndexedData))
    cs.store(group="schema/cluster", name="slurm", node=_writable(SlurmCluster))


register()
