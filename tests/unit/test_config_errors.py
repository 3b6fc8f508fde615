"""Bad configs: the config composed by Hydra (conf/, the overrides) fails validation with the key
that is wrong and the reason, in-process. The CLI's one stderr line and exit code:
tests/e2e/test_config_errors_cli.py."""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from conftest import REPO
from launcher.config.schema import EvalConfig, JobConfig, ModelConfig, ParallelConfig, SlurmCluster, TrainConfig
from launcher.config.validate import ConfigError, typed, validate
from models.args import ModelArgs
from parallel.engine_config import OptimConfig

FAST = ["train.seq_length=128", "train.global_batch_size=8", "train.micro_batch_size=2"]
DS = ["parallel.engine=deepspeed"]


def compose_config(*overrides: str, name: str = "config"):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def error_of(overrides: list[str], *, world_size: int = 1, device_type: str = "cpu") -> ConfigError:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(*overrides), world_size, device_type)
    return err.value


PREF = ["data=indexed", "data.prefixes=[pairs]", "data.tokenizer=tok.model"]  # a preference dataset's keys
CASES = [
    # overrides, key named in the error, words of its reason
    (["parallel.tp=3"], "parallel.tp", "must divide model.num_attention_heads=8"),
    (["model.num_query_groups=2", "parallel.tp=4"], "parallel.tp", "must divide model.num_query_groups=2"),
    (["parallel.pp=3"], "parallel.pp", "must divide model.num_layers=4"),
    (["parallel.pp=2", "parallel.vpp=4"], "parallel.pp", "pp=2 x vpp=4 must divide model.num_layers=4"),
    (["parallel.tp=2"], "parallel", "world size 1 is not divisible by tp*pp*cp = 2"),
    (["parallel.dp=2"], "parallel.dp", "dp=2 but world size 1"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size",
     "6 must be divisible by micro_batch_size 4 x dp 1"),
    (["train.seq_length=4096"], "train.seq_length", "exceeds model.max_position_embeddings=2048"),
    (["train.steps=0"], "train.steps", "must be a positive integer, got 0"),
    (["parallel.engine=fsdp"], "parallel.engine", "unknown engine"),
    (["device=tpu"], "device", "must be auto, cpu or cuda"),
    (["checkpoint.load=/nonexistent/ckpt"], "checkpoint.load", "no checkpoint directory"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last", "must be null or a positive integer"),
    (["checkpoint.save_every=-1"], "checkpoint.save_every", "must be >= 0"),
    (["train.recompute=[mlp,attention]"], "train.recompute", "got ['mlp', 'attention']"),
    (["train.recompute=some"], "train.recompute", "must be null, selective, full or a list"),
    (["model=qwen_moe_tiny", "train.recompute=[mlp_act]"], "train.recompute", "MoE experts: moe_act"),
    (["train.compile=true", "train.recompute=[mlp]"], "train.compile", "does not trace under torch.compile"),
    (["train.compile=true", "model=mixtral_tiny"], "train.compile", "compiled layers are dense only"),
    (["train.precision=fp16"], "train.precision", "must be auto, bf16, fp32 or fp8"),
    (["train.precision=fp8", "model=mixtral_tiny"], "train.precision", "linears of dense models"),
    (["train.precision=fp8", "train.compile=true"], "train.precision", "set train.compile=false"),
    (["train.cuda_graph=maybe"], "train.cuda_graph", "must be auto, true or false"),
    (["parallel.cp=2", "train.seq_length=126"], "train.seq_length", "126 must be a multiple of 2 x parallel.cp = 4"),
    (["parallel.cp=2", "parallel.cp_mode=ulysses"], "parallel.cp_mode", "must be ring or allgather"),
    (["train.moe_dispatch=alltoall"], "train.moe_dispatch", "must be fused or megatron"),
    (["train.attention_backend=xformers"], "train.attention_backend", "must be one of auto, cudnn, flash"),
    (["parallel.cp=2", "parallel.pp=2", "data.packing=true"], "data.packing",
     "packed rows under parallel.cp=2 do not run with parallel.pp=2"),
    (["parallel.cp=2", "model=mixtral_tiny", "data.reset_attention_mask=true"], "data.reset_attention_mask",
     "do not run with a mixture-of-experts model (model=mixtral_tiny)"),
    (["parallel.cp=2", "train.compile=true"], "train.compile", "parallel.cp=2"),
    (["parallel.cp=2", "parallel.engine=deepspeed"], "parallel.cp", "needs parallel.engine=megatron"),
    (["parallel.cp=2"], "parallel", "world size 1 is not divisible by tp*pp*cp = 2"),
    (["train.cuda_graph=true", "device=cpu"], "train.cuda_graph", "needs device=cuda"),
    (["train.peft=lora", "model=mixtral_tiny", "lora.targets=[qkv,fc1]"], "lora.targets",
     "fc1 and fc2 adapt dense MLPs and shared experts; model=mixtral_tiny has neither"),
    (["train.offload_activations=true", *DS], "train.offload_activations", "needs parallel.engine=megatron"),
    (["train.offload_activations=true", "train.cuda_graph=true"], "train.offload_activations",
     "not captured by a CUDA graph"),
    (["optim.cpu_offload=true", *DS], "optim.cpu_offload", "needs parallel.engine=megatron"),
    (["optim.cpu_offload=true", "parallel.distributed_optimizer=false"], "optim.cpu_offload",
     "needs parallel.distributed_optimizer=true"),
    (["optim.cpu_offload=true", "optim.precision_aware=true", "train.precision=bf16"], "optim.cpu_offload",
     "set optim.precision_aware=false"),
    (["optim.cpu_offload=true", "optim.main_grads_dtype=bf16"], "optim.main_grads_dtype",
     "needs train.precision=bf16"),
    (["logging.wandb.mode=cloud"], "logging.wandb.mode", "must be offline, online or disabled"),
    (["logging.profile_steps=[5,2]"], "logging.profile_steps", "1 <= start <= end"),
    (["logging.memory_snapshot=0"], "logging.memory_snapshot", "a step number >= 1"),
    (["data=indexed"], "data.prefixes", "must be set"),
    # MoE models and expert parallel
    (["model=mixtral_tiny", "parallel.ep=3"], "parallel.ep", "ep=3 must divide model.num_experts=8"),
    (["model=mixtral_tiny", "model.moe_router_topk=9"], "model.moe_router_topk", "top-k 9 exceeds model.num_experts=8"),
    (["parallel.ep=2"], "parallel.ep", "needs an MoE model"),
    (["model=mixtral_tiny", "parallel.ep=2"], "parallel.ep", "world size 1 is not divisible by tp*ep*pp = 2"),
    (["model=mixtral_tiny", "model.moe_router_enable_expert_bias=true"], "model.moe_router_enable_expert_bias",
     "needs model.moe_router_score_function=sigmoid"),
    (["model=mixtral_tiny", "model.moe_layer_freq=[1,0]"], "model.moe_layer_freq", "one 0/1 entry per layer (4)"),
    (["model=mixtral_tiny", "model.moe_router_num_groups=3", "model.moe_router_group_topk=1"],
     "model.moe_router_num_groups", "3 must divide model.num_experts=8"),
    (["model=mixtral_tiny", "model.moe_expert_capacity_factor=0"], "model.moe_expert_capacity_factor", "> 0"),
    # optim.precision_aware and its dtypes (fp32 on CPU: precision auto)
    ([*FAST, "optim.precision_aware=true"], "optim.precision_aware", "needs train.precision=bf16"),
    ([*FAST, "optim.precision_aware=true", "train.precision=bf16", "parallel.distributed_optimizer=false"],
     "optim.precision_aware", "needs parallel.distributed_optimizer=true"),
    ([*FAST, "optim.moments_dtype=bf16", "train.precision=bf16"], "optim.moments_dtype", "need optim.precision_aware"),
    ([*FAST, "optim.precision_aware=true", "train.precision=bf16", "optim.moments_dtype=fp8"], "optim.moments_dtype",
     "must be fp32 or bf16"),
    ([*FAST, "optim.main_grads_dtype=bf16", "train.precision=bf16"], "optim.main_grads_dtype",
     "need optim.precision_aware"),
    ([*FAST, "optim.master_weights=stochastic", "train.precision=bf16"], "optim.master_weights",
     "needs optim.precision_aware"),
    ([*FAST, "optim.precision_aware=true", "train.precision=bf16", "optim.master_weights=none"],
     "optim.master_weights", "must be exact or stochastic"),
    # engine=deepspeed
    ([*FAST, *DS, "parallel.pp=2"], "parallel.pp", "ZeRO-3 does not compose with pipeline parallelism"),
    ([*FAST, *DS, "parallel.tp=3"], "parallel.tp", "must divide model.num_attention_heads=8"),
    ([*FAST, *DS, "parallel.zero.offload_optimizer=disk"], "parallel.zero.offload_optimizer",
     "must be none, cpu or nvme"),
    ([*FAST, *DS, "parallel.zero.offload_params=nvme"], "parallel.zero.nvme_path", "needs a directory here"),
    ([*FAST, *DS, "model=mixtral_tiny"], "parallel.engine", "engine=deepspeed trains dense models"),
    # validation
    (["eval.every=-1"], "eval.every", "must be >= 0"),
    (["eval.iters=0"], "eval.iters", "must be a positive integer"),
    (["eval.every=5"], "eval.every", "needs validation data: data.split=98/2 or data.valid_prefixes=[...]"),
    (["eval.every=5", "data.split=100/0"], "eval.every", "needs validation data"),
    (["data.split=abc"], "data.split", "train,valid[,test] weights"),
    (["data.split=0/2"], "data.split", "no training documents"),
    (["data.split=98/2", "data.valid_prefixes=[x]"], "data.valid_prefixes", "either data.split or"),
    # preference objectives: their keys, then the layouts they run in (megatron or ZeRO-3,
    # pairs unpacked or packed, preference datasets read together, unweighted)
    (["train.objective=dpo"], "data.prefixes", "train.objective=dpo trains on preference datasets"),
    ([*PREF, "train.objective=dpo", "data.reset_attention_mask=true"], "data.reset_attention_mask",
     "does not run with reset_attention_mask (use data.packing=true) yet"),
    ([*PREF, "train.objective=dpo", "data.prefixes=[a,b]", "data.weights=[1,2]"], "data.weights",
     "reads its datasets' pairs together"),
    ([*PREF, "train.objective=orpo", "train.micro_batch_size=3", "train.global_batch_size=6"],
     "train.micro_batch_size", "must be even"),
    (["train.objective=ppo"], "train.objective", "must be one of lm, dpo, simpo, orpo, got 'ppo'"),
    (["train.objective=dpo", "dpo.loss=kto"], "dpo.loss", "must be one of sigmoid, robust, hinge, ipo"),
    (["dpo.reference=cached"], "dpo.reference", "must be one of precomputed, live"),
    (["train.objective=dpo", "dpo.beta=0"], "dpo.beta", "must be > 0"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing", "must be in [0, 0.5)"),
    (["dpo.loss=hinge", "dpo.label_smoothing=0.1"], "dpo.label_smoothing", "dpo.loss=hinge takes none"),
    (["dpo.sft_weight=-1"], "dpo.sft_weight", "must be >= 0"),
    (["simpo.gamma=-1"], "simpo.gamma", "must be >= 0"),
    (["simpo.label_smoothing=-0.1"], "simpo.label_smoothing", "must be in [0, 0.5)"),
    (["orpo.beta=-0.1"], "orpo.beta", "must be > 0"),
    (["orpo.nll=prompt"], "orpo.nll", "must be one of response, sequence, got 'prompt'"),
]


@pytest.mark.parametrize("overrides,key,words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_validation_error_names_key_and_reason(overrides, key, words):
    err = error_of(overrides)
    assert err.key == key and words in err.reason, err
    assert str(err) == f"config error: {key}: {err.reason}"


def test_engine_deepspeed_without_deepspeed_installed(monkeypatch):
    find_spec = importlib.util.find_spec

    def without_deepspeed(name, *args, **kwargs):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_deepspeed)
    err = error_of([*FAST, *DS])
    assert err.key == "parallel.engine" and "deepspeed is not installed" in err.reason and ".[deepspeed]" in err.reason


def test_tensorboard_without_tensorboard_installed_fails_at_start_up(monkeypatch):
    find_spec = importlib.util.find_spec

    def without_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            return None
        return find_spec(name, *args, **kwargs)

    assert validate(compose_config("logging.tensorboard=true"), 1, "cpu").config.logging.tensorboard
    monkeypatch.setattr(importlib.util, "find_spec", without_tensorboard)
    err = error_of(["logging.tensorboard=true"])
    assert err.key == "logging.tensorboard" and 'pip install "tensorboard>=2.16"' in err.reason
    validate(compose_config(), 1, "cpu")  # off by default: nothing to import


@pytest.mark.parametrize("override,key,hint", [
    ("+train.stepz=5", "train.stepz", "did you mean train.steps?"),
    ("+optim.warmup=5", "optim.warmup", "did you mean optim.warmup_steps?"),
    ("+model.num_layer=2", "model.num_layer", "did you mean model.num_layers?"),
    ("+data.prefixes=[a]", "data.prefixes", "stdlib_docs"),  # a key of another data option
    ("+parallel.zero.offload=cpu", "parallel.zero.offload", "did you mean parallel.zero.offload_params?"),
    ("+loging.verbose=true", "loging", "did you mean logging?"),
])
def test_a_key_added_with_plus_must_be_in_the_schema(override, key, hint):
    """Hydra's `+key=value` adds keys to a typed config; a misspelled one must not train ignored."""
    err = error_of([override])
    assert err.key == key and err.reason.startswith("unknown key") and hint in err.reason, err


def test_a_free_form_mapping_takes_new_keys():
    cfg = compose_config("cluster=slurm", "+cluster.env.NCCL_IB_HCA=mlx5", name="submit")
    assert typed(cfg).cluster.env["NCCL_IB_HCA"] == "mlx5"


def test_tokenizer_and_model_vocab_must_match(cache_env):
    from launcher.train import build_data

    with pytest.raises(ConfigError) as err:
        build_data(typed(compose_config("model.vocab_size=1000")))
    assert err.value.key == "model.vocab_size" and "has 4096 tokens but model.vocab_size is 1000" in err.value.reason


def test_missing_dataset(tmp_path):
    from launcher.train import build_data

    cfg = compose_config("data=indexed", f"data.prefixes=[{tmp_path / 'nope'}]", f"data.tokenizer={tmp_path / 'tok'}")
    with pytest.raises(ConfigError) as err:
        build_data(typed(cfg))
    assert err.value.key == "data.prefixes"
    assert err.value.reason == f"missing {tmp_path / 'nope'}.bin (run python -m launcher.preprocess)"


def test_validation_stream_that_would_repeat_is_an_error(cache_env, tmp_path):
    from launcher.train import build_data

    with pytest.raises(ConfigError) as err:
        build_data(typed(compose_config("data.split=98/2", "eval.iters=100000")))
    assert err.value.key == "eval.iters" and "100000 batches of 8 rows need 800000 held-out samples" in err.value.reason
    data = build_data(typed(compose_config("data.split=98/2", "eval.iters=2")))
    assert data.valid is not None and len(data.valid(step=1, dp_rank=0, dp_size=1, micro_batch_size=4,
                                                     global_batch_size=8)) == 2
    assert build_data(typed(compose_config("data.split=98/2", "eval.at_end=false"))).valid is None
    with pytest.raises(ConfigError) as err:
        build_data(typed(compose_config(f"data.valid_prefixes=[{tmp_path / 'nope'}]")))
    assert err.value.key == "data.valid_prefixes" and "missing" in err.value.reason


@pytest.mark.parametrize("name,overrides,key", [
    ("config", ["train.stepz=5"], "train.stepz"),
    ("config", ["cluster.nodes=2"], "cluster.nodes"),                                  # cluster=local has no nodes
    ("submit", ["cluster=slurm", "cluster.node=2"], "cluster.node"),                  # a typo of nodes
    ("config", ["submit.dry_run=true"], "submit.dry_run"),                            # launcher.submit's own key
])
def test_unknown_key_is_an_error(name, overrides, key):
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{key}'"):
        compose_config(*overrides, name=name)


@pytest.mark.parametrize("override,key", [
    ("train.compile=maybe", "train.compile"),
    ("train.steps=many", "train.steps"),
    ("optim.precision_aware=sometimes", "optim.precision_aware"),
    ("logging.profile_steps=5", "logging.profile_steps"),
])
def test_value_of_the_wrong_type_is_an_error(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(override)
    assert f"full_key: {key}" in str(err.value.__cause__), err.value.__cause__


def test_validation_returns_a_frozen_resolved_config_and_leaves_its_input_alone(tmp_path):
    cfg = compose_config("checkpoint.load=auto", f"checkpoint.dir={tmp_path}", "parallel.tp=2",
                         "train.micro_batch_size=2")
    resolved = validate(cfg, 4, "cpu")
    assert cfg.checkpoint.load == "auto"                    # the composed config is not written to
    assert resolved.config.checkpoint.load is None          # no `latest` in checkpoint.dir: a fresh start
    assert (resolved.layout.tp, resolved.layout.dp, resolved.layout.world_size) == (2, 2, 4)
    assert isinstance(resolved.config, JobConfig) and not resolved.cuda_graph
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.config.train.steps = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.layout.dp = 1


def test_preference_keys_are_typed():
    cfg = typed(compose_config("dpo.beta=0.2", "dpo.loss=ipo", "simpo.gamma=1.5", "orpo.beta=0.3"))
    assert (cfg.train.objective, cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.reference) == ("lm", 0.2, "ipo", "precomputed")
    assert (cfg.simpo.beta, cfg.simpo.gamma, cfg.orpo.beta) == (2.0, 1.5, 0.3)
    with pytest.raises(ConfigCompositionException):
        compose_config("dpo.beta=strong")


def test_default_groups_are_the_schema_defaults():
    """conf/ sets nothing for the default groups but the schema's defaults; a model YAML sets its shape."""
    cfg = typed(compose_config())
    assert (cfg.optim, cfg.parallel, cfg.train, cfg.eval) == (OptimConfig(), ParallelConfig(), TrainConfig(),
                                                              EvalConfig())
    assert (cfg.model.name, cfg.model.num_layers, cfg.data.name, cfg.cluster.name) == ("tiny", 4, "stdlib_docs", "local")


@pytest.mark.parametrize("model", ["mixtral_tiny", "qwen_moe_tiny", "mixtral_8x7b", "qwen3_30b_a3b",
                                   "deepseek_v2_lite_like"])
def test_moe_model_yaml_holds_only_what_differs_from_the_defaults(model):
    import yaml

    written = yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert not [k for k, v in written.items() if k != "name" and v == defaults[k]]
    args = ModelArgs.from_config(dataclasses.asdict(typed(compose_config(f"model={model}")).model))
    assert args.is_moe and args == ModelArgs.from_config(written)


# launcher.submit: the cluster's world size against the layout, and the cluster's own keys
SUBMIT = [
    (["model=llama3_8b", "cluster.nodes=3", "cluster.gpus_per_node=8", "parallel.tp=8", "parallel.pp=2"],
     "cluster.nodes", "3 nodes x 8 processes per node = 24 ranks: not divisible by tp*pp*cp = 16"),
    (["cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.tp=2", "train.global_batch_size=6",
      "train.micro_batch_size=2"], "train.global_batch_size",
     "6 must be divisible by micro_batch_size 2 x dp 2 (world size 4 = cluster.nodes 2 x 2 per node)"),
    (["cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.dp=3"], "parallel.dp",
     "(world size 4 = cluster.nodes 2 x 2 per node)"),
    (["cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.procs_per_node=2"], "cluster.procs_per_node",
     "one process per GPU"),
    (["cluster.launcher=mpirun"], "cluster.launcher", "must be torchrun or srun"),
    (["cluster.nodes=0"], "cluster.nodes", "must be an integer >= 1"),
    (["parallel.tp=3"], "parallel.tp", "must divide model.num_attention_heads=8"),
]


@pytest.mark.parametrize("overrides,key,words", SUBMIT, ids=[" ".join(c[0]) for c in SUBMIT])
def test_bad_cluster_config(overrides, key, words, tmp_path):
    from launcher.submit import build_job

    with pytest.raises(ConfigError) as err:
        build_job(typed(compose_config("cluster=slurm", *overrides, name="submit")), tmp_path, [])
    assert err.value.key == key and words in err.value.reason, err.value


def test_submit_refuses_the_local_cluster(tmp_path):
    from launcher.submit import build_job

    with pytest.raises(ConfigError) as err:
        build_job(typed(compose_config(name="submit")), tmp_path, [])
    assert err.value.key == "cluster" and "cluster=slurm" in err.value.reason


def test_missing_sbatch(tmp_path):
    from launcher.submit import _check_slurm

    cluster = typed(compose_config("cluster=slurm", "cluster.sbatch=/nonexistent/bin/sbatch", name="submit")).cluster
    assert isinstance(cluster, SlurmCluster)
    with pytest.raises(ConfigError) as err:
        _check_slurm(cluster)
    assert err.value.key == "cluster.sbatch" and "not found" in err.value.reason


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_a_preference_objective_validates_and_runs_uncaptured(objective, tmp_path):
    """The layouts that run validate (tp and dp); cuda_graph=auto does not capture a preference step."""
    resolved = validate(compose_config(*PREF, f"train.objective={objective}", "parallel.tp=2", f"run.dir={tmp_path}"),
                        4, "cuda")
    assert (resolved.layout.tp, resolved.layout.dp, resolved.cuda_graph) == (2, 2, False)
    moe = compose_config(*PREF, f"train.objective={objective}", "model=mixtral_tiny", "parallel.ep=2",
                         f"run.dir={tmp_path}")
    assert validate(moe, 2, "cpu").layout.ep == 2
    cp = compose_config(*PREF, f"train.objective={objective}", "parallel.cp=2", "data.packing=true",
                        f"run.dir={tmp_path}")
    assert validate(cp, 2, "cpu").layout.cp == 2
    vpp = compose_config(*PREF, f"train.objective={objective}", "parallel.pp=2", "parallel.vpp=2", "model.num_layers=4",
                         f"run.dir={tmp_path}")
    assert validate(vpp, 2, "cpu").layout.vpp == 2
    # packed rows hold whole pairs each: no batch size needs to be even
    packed = compose_config(*PREF, f"train.objective={objective}", "data.packing=true", "train.micro_batch_size=1",
                            "train.global_batch_size=3", f"run.dir={tmp_path}")
    assert validate(packed, 1, "cpu").config.data.packing
    assert validate(compose_config(*PREF, f"run.dir={tmp_path}"), 1, "cuda").cuda_graph  # lm: auto captures



def test_launcher_evaluate_refuses_a_preference_objective(tmp_path, monkeypatch):
    """launcher.evaluate reads LM data: a preference run's validation loss is the run's own (eval.every)."""
    from launcher import checkpoint, evaluate

    saved = tmp_path / "checkpoints" / "iter_0000002"
    saved.mkdir(parents=True)
    (saved / "metadata.json").write_text("{}")
    # (a directory that looks like a checkpoint; its contents are not what this checks)
    monkeypatch.setattr(checkpoint, "check_compatible", lambda *a: None)
    monkeypatch.setattr(checkpoint, "check_engine", lambda *a: None)
    with pytest.raises(ConfigError) as err:
        evaluate.run(compose_config(*PREF, "train.objective=simpo", f"checkpoint.load={saved}", f"run.dir={tmp_path}"))
    assert err.value.key == "train.objective" and "evaluates its pairs itself" in err.value.reason


def test_a_live_reference_resumes_only_a_checkpoint_that_holds_one(tmp_path, monkeypatch):
    """dpo.reference=live resuming a checkpoint saved without the live reference (here a ZeRO-3 one without
    its reference files) is a dpo.reference error before any process group."""
    import json

    from launcher import checkpoint
    from parallel.deepspeed_engine import REFERENCE_FILE, ZERO_META

    saved = tmp_path / "checkpoints" / "iter_0000002"
    saved.mkdir(parents=True)
    (saved / ZERO_META).write_text(json.dumps({"format": "deepspeed_zero3", "step": 2}))
    # (a directory that looks like a ZeRO-3 checkpoint; the shape and layout checks are not what this checks)
    monkeypatch.setattr(checkpoint, "check_compatible", lambda *a: None)
    monkeypatch.setattr(checkpoint, "check_engine", lambda *a: None)
    live = [*PREF, "train.objective=dpo", "dpo.reference=live", f"checkpoint.load={saved}", f"run.dir={tmp_path}"]
    with pytest.raises(ConfigError) as err:
        validate(compose_config(*live), 1, "cpu")
    assert err.value.key == "dpo.reference" and "holds no live DPO reference" in err.value.reason
    (saved / REFERENCE_FILE.format(rank=0)).write_bytes(b"")
    assert validate(compose_config(*live), 1, "cpu").start_step == 2
