"""LoRA (train.peft=lora) from an imported Hugging Face model: the same adapters in every layout
(tp; pp with vpp; cp over packed rows; tp with full recompute and the base held in fp8; DPO under dp;
ep and tp for a mixture-of-experts model with adapters on its experts) on top of a frozen base it never
changes, also over an fp8 base; adapter-only checkpoints that resume bit for bit, also from a moved
run dir; merged into the base (launcher.convert merge_lora) they compute what the unmerged model does
(logits, and launcher.evaluate's loss, which reads the adapters' settings from the checkpoint);
exported as a PEFT adapter (export_hf peft=true) transformers + peft give ShardForge's logits, for a
Llama and a Qwen2.

Random tiny HF models are imported (import_hf) and every LoRA run starts from the import
(checkpoint.load), fp32 on CPU, lora.dropout=0 and a learning rate at which B is far from zero
after the first step, so the adapters shape the later losses. One launch per world size."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST, read_metrics, run_many, tiny_hf_model, train_runs

STEPS = 4
SHAPE = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)
FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}
LORA = ["train.peft=lora", "lora.rank=4", "lora.alpha=8", "optim.lr=0.01", "optim.warmup_steps=1"]
# Packed rows (documents end at each EOD: no attention across them, positions restart), against the
# single process on the same rows.
PACKED = ["data.reset_attention_mask=true", "data.reset_position_ids=true"]
# A mixture-of-experts model with a shared expert from the seed's initial weights (no base checkpoint):
# adapters on attention, the shared expert and every routed expert.
MOE = ["model=qwen_moe_tiny", "lora.targets=[qkv,proj,fc1,fc2,experts]"]
NO_SAVE = ["checkpoint.final_save=false"]
DPO = "<dpo>"  # stands for the DPO overrides (the preference dataset the fixture makes)
# The 2-rank runs, each against the single-process run it must equal: (name, reference, base, overrides);
# base: the HF import they start from, or None for the seed's initial weights.
PARALLEL = [("tp2", "single", "llama", ["parallel.tp=2"]),
            ("pp2_vpp2", "single", "llama", ["parallel.pp=2", "parallel.vpp=2"]),
            ("cp2_packed", "single_packed", "llama", [*PACKED, "parallel.cp=2"]),
            ("tp2_recompute_full_base_fp8", "single_base_fp8", "llama",
             ["lora.base_fp8=true", "parallel.tp=2", "train.recompute=full"]),
            ("dpo_dp2", "dpo_single", "llama", [DPO]),
            ("moe_ep2", "moe_single", None, [*MOE, "parallel.ep=2"]),
            ("moe_tp2", "moe_single", None, [*MOE, "parallel.tp=2"])]
WORDS = "the quick brown fox jumps over a lazy dog while numbers add up and the function returns a list".split()


def _preference_data(d, cfg_overrides: list[str]) -> list[str]:
    """A small preference dataset (launcher.preprocess format=preference, in-process) in the default
    corpus's tokenizer; the overrides that train DPO on it."""
    import numpy as np
    from hydra import compose, initialize_config_dir

    from conftest import REPO
    from launcher.data.pretrain import prepare_default_corpus
    from launcher.preprocess import Options, preprocess

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        data = compose("config", overrides=cfg_overrides).data
    tokenizer = prepare_default_corpus(Path(data.cache_dir), data.tokenizer_vocab_size, data.max_corpus_bytes)[0]
    rng = np.random.default_rng(0)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    (d / "pairs.jsonl").write_text("\n".join(json.dumps({"prompt": f"Question {k}: {text(2, 10)}? ",
                                                         "chosen": text(1, 12), "rejected": text(1, 12)})
                                             for k in range(16)))
    options = Options(tokenizer=str(tokenizer), format="preference", text_key="text", messages_key="messages",
                      chat_template="chatml", append_eod=True, add_bos=False, seq_length=128)
    preprocess([d / "pairs.jsonl"], d / "pairs", options)
    return ["data=indexed", f"data.prefixes=[{d / 'pairs'}]", f"data.tokenizer={tokenizer}", "train.objective=dpo",
            "dpo.beta=0.1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_env):
    base = tmp_path_factory.mktemp("lora")
    for family, config in FAMILIES.items():
        tiny_hf_model(f"lora-{family}", config, **SHAPE).save_pretrained(base / f"hf_{family}")

    def start(family: str | None) -> list[str]:
        """From the import of `family`, or (None) from the seed's initial weights of the model `extra` names."""
        own = [f"model={base / family}", f"checkpoint.load={base / family}"] if family else []
        return [*FAST, "checkpoint.save_every=0", *own]

    dpo = _preference_data(base, FAST)

    def train(name: str, family: str | None, *extra: str) -> list[str]:
        extra = tuple(x for o in extra for x in (dpo if o == DPO else [o]))
        return ["launcher.train", *start(family), *LORA, f"train.steps={STEPS}", *extra, f"run.dir={base / name}"]

    iter4 = base / "single" / "checkpoints" / "iter_0000004"
    run_many([*(["launcher.convert", "import_hf", f"hf_dir={base / f'hf_{family}'}", f"out={base / family}"]
                for family in FAMILIES),
              ["launcher.train", *start("llama"), "train.steps=1", *NO_SAVE, f"run.dir={base / 'full'}"],
              train("single", "llama", "checkpoint.save_every=2"),
              train("resumed", "llama", f"checkpoint.load={base / 'single' / 'checkpoints' / 'iter_0000002'}"),
              train("single_packed", "llama", *PACKED, *NO_SAVE),
              train("single_base_fp8", "llama", "lora.base_fp8=true", *NO_SAVE),
              ["launcher.convert", "merge_lora", f"checkpoint={iter4}", f"out={base / 'merged'}"],
              ["launcher.convert", "export_hf", f"checkpoint={iter4}", f"out={base / 'peft_llama'}", "peft=true"],
              ["launcher.convert", "export_hf", f"checkpoint={base / 'llama'}", f"out={base / 'export_llama'}"],
              ["launcher.convert", "export_hf", f"checkpoint={base / 'merged'}", f"out={base / 'export_merged'}"],
              ["tests.scripts.lora_logits", str(base / "logits_llama.pt"), str(iter4), str(base / "merged")],
              *(["launcher.generate", f"checkpoint.load={checkpoint}", "prompt_ids=5,17,300,42",
                 "max_new_tokens=8", f"output_json={base / f'generate_{name}.json'}"]
                for name, checkpoint in (("lora", iter4), ("merged", base / "merged"))),
              # (no train.peft or lora key: the LoRA checkpoint's own settings)
              *(["launcher.evaluate", *FAST, f"model={checkpoint}", f"checkpoint.load={checkpoint}", "eval.iters=2",
                 f"evaluate.output={base / f'evaluate_{name}.json'}"]
                for name, checkpoint in (("lora", iter4), ("merged", base / "merged"))),
              train("qwen2_lora", "qwen2", "train.steps=2"),
              ["launcher.convert", "export_hf", f"checkpoint={base / 'qwen2_lora' / 'checkpoints'}",
               f"out={base / 'peft_qwen2'}", "peft=true"],
              ["launcher.convert", "export_hf", f"checkpoint={base / 'qwen2'}", f"out={base / 'export_qwen2'}"],
              ["tests.scripts.lora_logits", str(base / "logits_qwen2.pt"), str(base / "qwen2_lora" / "checkpoints")],
              # the single run again, one step longer: a restart in its run.dir resumes its own checkpoint
              train("single", "llama", "checkpoint.save_every=2", f"train.steps={STEPS + 1}", "checkpoint.load=auto"),
              train("dpo_single", "llama", DPO, *NO_SAVE),
              train("dpo_live", "llama", DPO, "dpo.reference=live", *NO_SAVE),
              train("moe_single", None, *MOE),
              *(train(name, None, f"train.precision={name}", *NO_SAVE) for name in ("bf16", "fp8")),
              ["launcher.convert", "merge_lora", f"checkpoint={base / 'moe_single' / 'checkpoints'}",
               f"out={base / 'moe_merged'}"],
              ["tests.scripts.lora_logits", str(base / "logits_moe.pt"), str(base / "moe_single" / "checkpoints"),
               str(base / "moe_merged")]])
    frozen = ["tests.scripts.lora_frozen_base", str(base / "frozen_tp2.json"), *start("llama"), *LORA,
              "train.steps=2", "parallel.tp=2", f"run.dir={base / 'frozen_tp2'}"]
    train_runs(base, [(name, train(name, family, *extra, *NO_SAVE)[1:-1], 2) for name, _, family, extra in PARALLEL],
               then=[("frozen_tp2", frozen, 2)])
    return base


@pytest.mark.parametrize("name,reference", [x[:2] for x in PARALLEL])
def test_layout_matches_single_process(base, name, reference):
    reference, got = read_metrics(base / reference), read_metrics(base / name)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for ref, m in zip(reference, got):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5), m["step"]
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), m["step"]
        assert m["tokens"] == ref["tokens"]


def test_starts_from_the_base_checkpoint(base):
    """B = 0 at the start: the first LoRA step's loss is the imported model's, as full fine-tuning sees it."""
    full, lora = read_metrics(base / "full"), read_metrics(base / "single")
    assert lora[0]["loss"] == full[0]["loss"]
    assert lora[0]["grad_norm"] != full[0]["grad_norm"]  # (other parameters train)


def test_dpo_trains_the_adapters_against_the_base(base):
    """DPO's reference log-probs come from the initial weights, the base itself (B = 0): at the first
    step the policy equals its reference, so the loss is -log sigmoid(0) = log 2; then it moves."""
    steps = read_metrics(base / "dpo_single")
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert steps[-1]["loss"] < math.log(2) - 1e-4  # the adapters learn the preference


def test_fp8_base_tracks_the_bf16_base(base):
    """The embedded default model from its seed: LoRA over fp8 GEMMs of the frozen base against bf16 ones."""
    bf16, fp8 = ([m["loss"] for m in read_metrics(base / name)] for name in ("bf16", "fp8"))
    assert fp8 != bf16  # the fp8 GEMMs did run
    assert fp8 == pytest.approx(bf16, rel=5e-3)


def test_base_held_in_fp8_approximates_the_base(base):
    """lora.base_fp8: the first loss is the quantised base's, near the base's own (and not equal)."""
    quantised, full = read_metrics(base / "single_base_fp8")[0]["loss"], read_metrics(base / "single")[0]["loss"]
    assert quantised != full and quantised == pytest.approx(full, rel=1e-3)


def test_dpo_live_reference_is_the_base(base):
    """dpo.reference=live under LoRA: each step's reference log-probs from the policy with its adapters
    off (no copy of the model), the same as the table precomputed from the initial weights (B = 0)."""
    live, precomputed = read_metrics(base / "dpo_live"), read_metrics(base / "dpo_single")
    assert [(m["loss"], m["grad_norm"]) for m in live] == [(m["loss"], m["grad_norm"]) for m in precomputed]


def test_a_restart_resumes_its_own_checkpoint(base):
    """checkpoint.load=auto in the run's own run.dir (a requeued job): the adapters' checkpoint, on the
    base its lora.json names, one step on."""
    assert [m["step"] for m in read_metrics(base / "single")] == list(range(1, STEPS + 2))
    saved = json.loads((base / "single" / "checkpoints" / f"iter_{STEPS + 1:07d}" / "lora.json").read_text())
    assert saved["base_absolute"] == str((base / "llama" / "iter_0000000").resolve())


def test_resume_is_bit_exact(base):
    full, resumed = read_metrics(base / "single"), read_metrics(base / "resumed")
    # the resumed run's own checkpoint still names the import as its base
    saved = json.loads((base / "resumed" / "checkpoints" / "iter_0000004" / "lora.json").read_text())
    assert saved["base_absolute"] == str((base / "llama" / "iter_0000000").resolve())
    assert [m["step"] for m in resumed] == [3, 4]
    for ref, m in zip(full[2:], resumed):
        assert (m["loss"], m["grad_norm"], m["lr"]) == (ref["loss"], ref["grad_norm"], ref["lr"])


def test_checkpoint_holds_the_adapters_and_a_reference_to_the_base(base):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    saved = base / "single" / "checkpoints" / "iter_0000004"
    reference = json.loads((saved / "lora.json").read_text())
    imported = base / "llama" / "iter_0000000"
    # relative to the checkpoint (what a moved run dir follows), and where it was
    assert reference["base"] == "../../../llama/iter_0000000"
    assert reference["base_absolute"] == str(imported.resolve())
    assert (reference["rank"], reference["alpha"], reference["targets"]) == (4, 8.0, ["qkv", "proj", "fc1", "fc2"])
    assert reference["base_model"]["num_layers"] == 4
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        keys = [k for k in dist_checkpointing.load_tensors_metadata(str(saved)) if not k.endswith("_extra_state")]
    finally:
        dist.destroy_process_group()
    model = [k for k in keys if not k.startswith("optimizer.")]
    assert sorted({k.rsplit(".", 1)[-1] for k in model}) == ["lora_a", "lora_b"], model
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    base_size = sum(f.stat().st_size for f in imported.rglob("*") if f.is_file())
    assert size < base_size / 4, (size, base_size)


def test_only_the_adapters_train(base):
    """tp2, two steps in-process: every base tensor bit-identical after them, every adapter tensor
    changed, and DDP's gradient buffers (what the optimizer steps) hold adapters only."""
    result = json.loads((base / "frozen_tp2.json").read_text())
    assert sorted(k.rsplit(".", 1)[-1] for k in result["changed"]) == ["lora_a"] * 4 + ["lora_b"] * 4
    # (A moves only from the second step on: its gradient is zero while B is)
    assert all(change > 1e-3 for k, change in result["changed"].items() if k.endswith("lora_b")), result["changed"]
    assert "decoder.layers.self_attention.linear_qkv.weight" in result["unchanged"]
    assert len(result["unchanged"]) == 9
    assert len(result["in_grad_buffers"]) == 4 * 4 * 2
    assert all(k.endswith((".lora_a", ".lora_b")) for k in result["in_grad_buffers"])


@pytest.mark.parametrize("name", ["llama", "moe"])
def test_merged_checkpoint_computes_the_unmerged_model(base, name):
    """Also for the MoE model, whose base is the seed's initial weights and whose experts carry adapters."""
    logits = torch.load(base / f"logits_{name}.pt")
    scale = logits["unmerged"].abs().max().item()
    assert (logits["merged"] - logits["unmerged"]).abs().max().item() <= 1e-6 * scale
    if name == "llama":
        assert (base / "merged" / "iter_0000000" / "hf_config.json").is_file()  # the base's files came along


def test_generate_reads_a_lora_checkpoint(base):
    """launcher.generate on the LoRA checkpoint (base + adapters) continues greedily as on the merged one."""
    lora, merged = (json.loads((base / f"generate_{name}.json").read_text()) for name in ("lora", "merged"))
    assert len(lora["generated_ids"]) == 8 and lora["generated_ids"] == merged["generated_ids"]


def test_a_moved_run_dir_still_loads(base, tmp_path):
    """The run dir copied elsewhere together with its base loads that copy of the base (lora.json's
    path relative to the checkpoint); copied alone, the base where it was saved. Either way its
    adapters load on the base as training left them (the engine's load, which resuming runs): the
    logits of the run's own checkpoint. A lora.json that names its base by an absolute path only
    still reads."""
    from launcher.lora_convert import lora_reference
    from parallel.lora_checkpoint import REFERENCE, read_reference
    from tests.scripts import lora_logits

    archive, alone = tmp_path / "archive", tmp_path / "elsewhere" / "deeper" / "single"
    for name in ("llama", "single"):
        shutil.copytree(base / name, archive / name)
    shutil.copytree(base / "single", alone)
    iter4 = Path("checkpoints") / "iter_0000004"
    _, reference = lora_reference(str(archive / "single" / iter4))  # (what merge_lora and export_hf read)
    assert reference["base"] == str((archive / "llama" / "iter_0000000").resolve())
    original = str((base / "llama" / "iter_0000000").resolve())
    assert read_reference(alone / iter4)["base"] == original
    saved = json.loads((alone / iter4 / REFERENCE).read_text())
    (alone / iter4 / REFERENCE).write_text(json.dumps({**saved, "base": original, "base_absolute": None}))
    assert read_reference(alone / iter4)["base"] == original

    expected = torch.load(base / "logits_llama.pt")["unmerged"]
    for run in (archive / "single", alone):
        lora_logits.main(str(tmp_path / "logits.pt"), str(run / iter4), None)
        got = torch.load(tmp_path / "logits.pt")["unmerged"]
        assert (got - expected).abs().max().item() <= 1e-6 * expected.abs().max().item(), run


def test_evaluate_reads_the_adapter_settings_from_the_checkpoint(base):
    """launcher.evaluate pointed at the LoRA checkpoint alone (no train.peft or lora key) gives the loss
    of its merge_lora checkpoint."""
    lora, merged = (json.loads((base / f"evaluate_{name}.json").read_text()) for name in ("lora", "merged"))
    assert lora["eval_tokens"] == merged["eval_tokens"] > 0
    assert lora["eval_loss"] == pytest.approx(merged["eval_loss"], abs=1e-5)


def test_evaluate_refuses_a_lora_key_that_differs_from_the_checkpoint(base):
    from hydra import compose, initialize_config_dir

    from conftest import REPO
    from launcher import evaluate
    from launcher.config.validate import ConfigError
    from launcher.model_path import resolve_model_argv

    argv = [f"model={base / 'llama'}", f"checkpoint.load={base / 'single' / 'checkpoints'}", "lora.alpha=16"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="evaluate", overrides=resolve_model_argv(argv))
    with pytest.raises(ConfigError) as err:
        evaluate.run(cfg)
    assert err.value.key == "lora.alpha" and "16.0 differs from the adapters" in err.value.reason, err.value


def test_merged_checkpoint_exports_to_transformers(base):
    """export_hf of the merged checkpoint, loaded by transformers alone, gives the LoRA model's logits."""
    import transformers

    logits = torch.load(base / "logits_llama.pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(base / "export_merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(logits["tokens"]).logits
    assert (ours - logits["unmerged"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_export_gives_shardforge_s_logits(base, family):
    import peft
    import transformers

    logits = torch.load(base / f"logits_{family}.pt")
    config = json.loads((base / f"peft_{family}" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    model = transformers.AutoModelForCausalLM.from_pretrained(base / f"export_{family}", dtype=torch.float32).eval()
    with torch.no_grad():
        plain = model(logits["tokens"]).logits
        lora = peft.PeftModel.from_pretrained(model, base / f"peft_{family}").eval()
        ours = lora(logits["tokens"]).logits
    assert (ours - logits["unmerged"]).abs().max().item() < 1e-5
    assert (plain - logits["unmerged"]).abs().max().item() > 1e-3  # the adapters matter


@pytest.mark.parametrize("overrides,key,words", [
    ([], "checkpoint.load", "holds LoRA adapters: train them with train.peft=lora, or merge them first"),
    ([*LORA, "lora.rank=8"], "lora.rank", "8 differs from the adapters of checkpoint.load"),
    ([*LORA, "lora.targets=[qkv]"], "lora.targets", "['qkv'] differs from the adapters"),
])
def test_a_lora_checkpoint_that_does_not_fit_the_run_is_refused(base, tmp_path, overrides, key, words):
    from hydra import compose, initialize_config_dir

    from conftest import REPO
    from launcher.config.validate import ConfigError, validate
    from launcher.model_path import resolve_model_argv

    argv = [f"model={base / 'llama'}", f"checkpoint.load={base / 'single' / 'checkpoints'}",
            f"run.dir={tmp_path / 'run'}", *overrides]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=resolve_model_argv(argv))
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1, "cpu")
    assert err.value.key == key and words in err.value.reason, err.value


def test_conversions_tell_lora_checkpoints_apart(base, tmp_path):
    from launcher.config.validate import ConfigError
    from launcher.convert import export_hf
    from launcher.lora_convert import merge_lora

    with pytest.raises(ConfigError, match="holds LoRA adapters: export them with peft=true"):
        export_hf(str(base / "single" / "checkpoints"), tmp_path / "hf")
    with pytest.raises(ConfigError, match="holds no LoRA adapters"):
        merge_lora(str(base / "llama"), tmp_path / "merged")
