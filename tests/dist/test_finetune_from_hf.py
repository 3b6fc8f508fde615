"""Fine-tuning starts from an imported Hugging Face model: `checkpoint.load=<import_hf output>`
loads the weights only (step 0) and the first step's loss equals transformers' loss on the
same batch; under tp=2 as well. The tp=1 run takes its shape from the import (`model=<its dir>`).

Preference training from the same import, in the same launches: DPO (precomputed reference, with the RPO
term), SimPO and ORPO (its NLL over the response, or over prompt and response as TRL's) train on pairs
(DPO also on two datasets read together); the reference file and the first step's loss, rewards, log-
probs and gradient norm equal transformers' forward of the HF model through TRL's losses
(tests/trl_oracle.py), and the weights after one DPO step (exported to HF) equal torch's AdamW step on
TRL's loss, its validation loss TRL's loss of that stepped model; DPO under tp=2, dp=2 (with full
recompute), pp=2, cp=2 and engine=deepspeed (ZeRO-3, dp=2) equals the single process over its steps, and
a resumed DPO run reads its reference file and continues bit for bit; DPO with a live reference model
(single process, pp=2, ZeRO-3) equals DPO from the precomputed one and resumes bit for bit; DPO under
pp=2 x vpp=2 (a 4-layer model) equals the single process with either reference; DPO from an imported
Mixtral equals transformers + TRL (with megatron-core's load-balancing loss) and, under ep=2, the single
process; DPO and SimPO on pairs packed into rows equal the same pairs unpacked, and packed DPO under
pp=2 and cp=2 the single process."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir

from conftest import FAST, REPO, read_metrics, run_many

SHAPE = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
         "num_query_groups": 2, "vocab_size": 4096}
OVERRIDES = [f"model.{k}={v}" for k, v in SHAPE.items()] + [*FAST, "train.steps=1", "checkpoint.final_save=false"]
PREF_STEPS = 3
# One DPO optimizer step against torch's AdamW on the HF model (dpo_step): a constant lr, and an epsilon
# near the gradients' size, so each update follows the gradient's value and not only its sign
STEP_OPTIM = {"lr": 0.01, "eps": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "clip_grad": 1.0}
# (run name, objective overrides, ranks, steps)
PREFERENCE_RUNS = [("dpo", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5"], 1, PREF_STEPS),
                   ("simpo", ["train.objective=simpo", "simpo.beta=2.0", "simpo.gamma=0.5",
                              "simpo.sft_weight=0.25"], 1, 1),
                   ("orpo", ["train.objective=orpo", "orpo.beta=0.1"], 1, 1),
                   # its NLL over prompt and response, as TRL's ORPOTrainer
                   ("orpo_sequence", ["train.objective=orpo", "orpo.beta=0.1", "orpo.nll=sequence"], 1, 1),
                   # the dpo run again, saving after step 2; then resumed from there (RESUME)
                   ("dpo_saved", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5",
                                  "checkpoint.save_every=2"], 1, PREF_STEPS),
                   ("dpo_tp2", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5", "parallel.tp=2"], 2,
                    PREF_STEPS),
                   ("dpo_dp2", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5", "train.recompute=full"],
                    2, PREF_STEPS),
                   ("dpo_pp2", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5", "parallel.pp=2"], 2,
                    PREF_STEPS),
                   ("dpo_cp2", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5", "parallel.cp=2"], 2,
                    PREF_STEPS),
                   ("dpo_zero3", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5",
                                  "parallel.engine=deepspeed"], 2, PREF_STEPS),  # ZeRO-3 over dp=2
                   ("dpo_zero3_live", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5",
                                       "parallel.engine=deepspeed", "dpo.reference=live"], 2, PREF_STEPS),
                   # a 4-layer model (random initial weights: the import has 2 layers) for the interleaved
                   # pipeline (pp=2 x vpp=2), precomputed and live reference, against the single process
                   *[(name, ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5", "model.num_layers=4",
                             "checkpoint.load=null", *extra], nproc, PREF_STEPS)
                     for name, extra, nproc in (("dpo4", [], 1),
                                                ("dpo4_vpp", ["parallel.pp=2", "parallel.vpp=2"], 2),
                                                ("dpo4_vpp_live", ["parallel.pp=2", "parallel.vpp=2",
                                                                   "dpo.reference=live"], 2))],
                   # the dpo run with a frozen reference model held alongside instead of the precomputed table
                   ("dpo_live", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5", "dpo.reference=live"], 1,
                    PREF_STEPS),
                   # the dpo_live run again, saving after step 2 (its reference too); then resumed from there
                   ("dpo_live_saved", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5",
                                       "dpo.reference=live", "checkpoint.save_every=2"], 1, PREF_STEPS),
                   ("dpo_live_pp2", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5", "dpo.reference=live",
                                     "parallel.pp=2"], 2, PREF_STEPS)]
PACKED_STEPS = 2
# (objective, its overrides) trained on all pairs each step, unpacked and packed (packed_runs)
PACKED_OBJECTIVES = [("dpo", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5"]),
                     ("simpo", ["train.objective=simpo", "simpo.beta=2.0", "simpo.gamma=0.5", "simpo.sft_weight=0.25"])]
# the preference datasets a run reads, where it reads others than `pairs`
DATASETS = {"dpo_two": ("pairs", "pairs_valid")}
# a random transformers Mixtral for DPO with experts (moe_runs): 4 experts, top 2, a load-balancing loss
MOE_CONFIG = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.1,
                  sliding_window=None, tie_word_embeddings=False, max_position_embeddings=2048)
WORDS = ("the quick brown fox jumps over a lazy dog while numbers add up to twelve thousand and the function "
         "returns a list of items sorted by key").split()


def _default_tokenizer() -> Path:
    """The tokenizer of the default corpus, whose vocabulary the test model's shape has."""
    from launcher.config import schema  # noqa: F401  (registers the config schemas with Hydra)
    from launcher.data.pretrain import prepare_default_corpus

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=OVERRIDES)
    return prepare_default_corpus(Path(cfg.data.cache_dir), cfg.data.tokenizer_vocab_size,
                                  cfg.data.max_corpus_bytes)[0]


def _preference_data(d: Path, tokenizer: Path, name: str = "pairs", seed: int = 0) -> Path:
    """A small preference dataset of plain-text pairs (launcher.preprocess format=preference, in-process)."""
    from launcher.preprocess import Options, preprocess

    rng = np.random.default_rng(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    src = d / f"{name}.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": f"Question {k}: {text(2, 12)}? ", "chosen": text(1, 14),
                                         "rejected": text(1, 14)}) for k in range(12)))
    options = Options(tokenizer=str(tokenizer), format="preference", text_key="text", messages_key="messages",
                      chat_template="chatml", append_eod=True, add_bos=False, seq_length=128)
    preprocess([src], d / name, options)
    return d / name


def two_datasets_run(d: Path) -> tuple[str, list[str], int, int]:
    """The dpo run's first step on two preference datasets read together (DATASETS)."""
    return ("dpo_two", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5",
                        f"data.prefixes=[{','.join(str(d / n) for n in DATASETS['dpo_two'])}]"], 1, 1)


def step_run(d: Path) -> tuple[str, list[str], int, int]:
    """One step of the dpo run, saved (exported to HF by the same launch), then evaluated on the first
    batch of another preference dataset (<d>/pairs_valid)."""
    return ("dpo_step", ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5", "checkpoint.final_save=true",
                         "optim.warmup_steps=0", "optim.decay_style=constant",
                         *[f"optim.{k}={v}" for k, v in STEP_OPTIM.items()],
                         f"data.valid_prefixes=[{d / 'pairs_valid'}]", "eval.every=1", "eval.iters=1"], 1, 1)


def packed_runs(prefix: Path) -> list[tuple[str, list[str], int, int]]:
    """Each of PACKED_OBJECTIVES with every pair in every step's global batch: unpacked (`<name>_all`, one
    sequence per row) and packed (`<name>_all_packed`, the dataset's packed rows a step, one per micro
    batch), so both runs train on the same pairs; and packed DPO under pp=2 and cp=2."""
    from launcher.data.indexed import IndexedDataset
    from launcher.data.preference import PreferencePairs
    from launcher.data.preference_batches import PackedPreferenceBatches

    pairs = len(PreferencePairs(IndexedDataset(str(prefix)), 128))
    packed = PackedPreferenceBatches(PreferencePairs(IndexedDataset(str(prefix)), 128, packed=True), 128, 0, 0)
    assert len(packed) == pairs and len(packed.rows) <= pairs / 2  # the same pairs, two or more a row
    runs = []
    for name, extra in PACKED_OBJECTIVES:
        runs += [(f"{name}_all", [*extra, f"train.global_batch_size={2 * pairs}",
                                  f"train.micro_batch_size={4 if pairs % 2 == 0 else 2}"], 1, PACKED_STEPS),
                 (f"{name}_all_packed", [*extra, "data.packing=true", f"train.global_batch_size={len(packed.rows)}",
                                         "train.micro_batch_size=1"], 1, PACKED_STEPS)]
    dpo_packed = runs[1]
    return [*runs, *[(f"dpo_all_packed_{name}", [*dpo_packed[1], extra], 2, PACKED_STEPS)
                     for name, extra in (("pp2", "parallel.pp=2"), ("cp2", "parallel.cp=2"))]]


def moe_runs(d: Path) -> list[tuple[str, list[str], int, int]]:
    """DPO from the imported Mixtral (MOE_CONFIG, saved to <d>/hf_moe, imported to <d>/ckpt_moe), in one
    process and under ep=2."""
    dpo = ["train.objective=dpo", "dpo.beta=0.1", "dpo.sft_weight=0.5", f"model={d / 'ckpt_moe'}",
           f"checkpoint.load={d / 'ckpt_moe'}"]
    return [("dpo_moe", dpo, 1, PREF_STEPS), ("dpo_moe_ep2", [*dpo, "parallel.ep=2"], 2, PREF_STEPS)]


def _preference_overrides(d: Path, tokenizer: Path, extra: list[str], steps: int) -> list[str]:
    own = {o.split("=")[0] for o in extra}  # the run's own value of a key wins
    keep = [o for o in OVERRIDES if o != "train.steps=1" and o.split("=")[0] not in own
            and not ("model" in own and o.startswith("model."))]  # model=<checkpoint>: its own shape
    load = [] if "checkpoint.load" in own else [f"checkpoint.load={d / 'ckpt'}"]
    data = [] if "data.prefixes" in own else [f"data.prefixes=[{d / 'pairs'}]"]
    return ["launcher.train", *keep, f"train.steps={steps}", "data=indexed", *data, f"data.tokenizer={tokenizer}",
            *load, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_env):
    """A random transformers Llama, its import_hf checkpoint, and one step from that checkpoint
    under tp=1 and tp=2 (run dirs tp1, tp2; their outputs)."""
    d = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(d / "hf")

    def train(tp: int) -> list[str]:
        # tp=1 takes the shape from the checkpoint itself (model=<checkpoint dir>), tp=2 from overrides
        shape = [f"model={d / 'ckpt'}"] if tp == 1 else [o for o in OVERRIDES if o.startswith("model.")]
        return ["launcher.train", *shape, *[o for o in OVERRIDES if not o.startswith("model.")], f"parallel.tp={tp}",
                f"checkpoint.load={d / 'ckpt'}", f"run.dir={d / f'tp{tp}'}"]

    torch.manual_seed(1)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**MOE_CONFIG)).save_pretrained(d / "hf_moe")

    tokenizer = _default_tokenizer()
    _preference_data(d, tokenizer, "pairs_valid", seed=1)
    runs = [*PREFERENCE_RUNS, step_run(d), two_datasets_run(d), *packed_runs(_preference_data(d, tokenizer)),
            *moe_runs(d)]
    preference = {n: [*_preference_overrides(d, tokenizer, extra, steps), f"run.dir={d / n}"]
                  for n, extra, _, steps in runs}
    ranks = {n: nproc for n, _, nproc, _ in runs}
    single = [n for n in preference if ranks[n] == 1]
    double = [n for n in preference if ranks[n] == 2]
    def resume(name: str) -> list[str]:
        """`name`'s run resumed from its step-2 checkpoint in its own run.dir."""
        return [o for o in preference[name] if not o.startswith("checkpoint.load=")] + [
            f"checkpoint.load={d / name / 'checkpoints' / 'iter_0000002'}"]

    export = ["launcher.convert", "export_hf", f"checkpoint={d / 'dpo_step' / 'checkpoints'}", f"out={d / 'dpo_step_hf'}"]
    _, _, tp1, *pref1, resumed, resumed_live, _ = run_many(
        [["launcher.convert", "import_hf", f"hf_dir={d / 'hf'}", f"out={d / 'ckpt'}"],
         ["launcher.convert", "import_hf", f"hf_dir={d / 'hf_moe'}", f"out={d / 'ckpt_moe'}"],
         train(1), *(preference[n] for n in single), resume("dpo_saved"), resume("dpo_live_saved"), export])
    [tp2, *pref2] = run_many([train(2), *(preference[n] for n in double)], nproc=2)
    return model, d, {"tp1": tp1, "tp2": tp2, **dict(zip(single, pref1)), **dict(zip(double, pref2)),
                      "resumed": resumed, "resumed_live": resumed_live}


def _reference_loss(model) -> float:
    """transformers' mean token loss on the batch ShardForge trains on at step 0."""
    from launcher.train import build_data

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=OVERRIDES)
    batches = build_data(cfg).batches(step=0, dp_rank=0, dp_size=1, micro_batch_size=2, global_batch_size=8)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["tokens"]).logits.float()
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none")
            total += (losses * b["loss_mask"].flatten()).sum().item()
            count += int(b["loss_mask"].sum())
    return total / count


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_first_step_loss_equals_transformers(trained, name):
    model, d, outputs = trained
    assert "steps=0->1" in outputs[name]  # a model-only checkpoint starts training at step 0
    assert ("shardforge: model=hf " in outputs[name]) == (name == "tp1")  # the import's own shape and name
    assert read_metrics(d / name)[0]["loss"] == pytest.approx(_reference_loss(model), rel=1e-5)


def _first_batch(d: Path, *names: str):
    """Step 0's global batch of pairs of datasets <d>/<name> (`pairs` by default; several: one after the
    other) as ShardForge reads it (dataset order: 2k chosen, 2k + 1 rejected)."""
    from launcher.data.indexed import IndexedDataset
    from launcher.data.preference import ConcatenatedPairs, PreferencePairs
    from launcher.data.preference_batches import PreferenceBatches

    parts = [PreferencePairs(IndexedDataset(str(d / name)), 128) for name in names or ("pairs",)]
    pairs = parts[0] if len(parts) == 1 else ConcatenatedPairs(parts)
    batches = PreferenceBatches(pairs, 128, seed=1234, pad_id=0)
    order = [batches.pair_at(j) for j in range(4)]  # train.global_batch_size=8 rows: 4 pairs
    return batches.pairs, order


def _hf_batch(model, pairs, order):
    """tests/trl_oracle.Batch of these pairs with transformers' logits (TRL's order, right-padded)."""
    from trl_oracle import Batch

    ids, masks = [], []
    for k in order:
        pair = pairs.pair(k)
        ids += [pair.chosen_ids, pair.rejected_ids]
        masks += [pair.chosen_mask, pair.rejected_mask]
    shell = Batch(ids, masks, torch.zeros(len(ids), max(len(x) for x in ids), 1), torch.zeros(len(ids)))
    logits = model(shell.trl_tensors()["input_ids"]).logits.float()  # causal: right padding changes nothing before it
    return shell, logits


def _hf_sums(model, pairs, order) -> torch.Tensor:
    """transformers' summed response log-probs [pairs, 2] (chosen, rejected)."""
    shell, logits = _hf_batch(model, pairs, order)
    t = shell.trl_tensors()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, t["input_ids"][:, 1:, None])[..., 0]
    sums = (logps * t["completion_mask"][:, 1:]).sum(1)
    n = len(order)
    return torch.stack([sums[:n], sums[n:]], 1).detach().double()


# the "dpo" runs' loss, as trl_oracle.trl_dpo_loss's arguments: sigmoid with beta 0.1, plus 0.5 · NLL (RPO)
RPO = dict(beta=0.1, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5])


def _trl_batch(policy, pairs, order, reference_model=None):
    """tests/trl_oracle.Batch of these pairs with `policy`'s logits; with `reference_model`, that model's
    summed response log-probs as the reference."""
    from trl_oracle import Batch

    shell, logits = _hf_batch(policy, pairs, order)
    batch = Batch(shell.ids, shell.masks, logits, torch.zeros(len(shell.ids)))
    if reference_model is not None:
        with torch.no_grad():
            batch.reference = _hf_sums(reference_model, pairs, order).float().reshape(-1)
    return batch


def test_dpo_reference_file_equals_transformers(trained):
    model, d, _ = trained
    pairs, _ = _first_batch(d)
    [path] = (d / "dpo" / "reference_logps").glob("*.npy")
    table = np.load(path)
    with torch.no_grad():
        expected = _hf_sums(model, pairs, list(range(len(pairs)))).numpy()
    np.testing.assert_allclose(table, expected, rtol=1e-5)


def _trl_first_step(model, d: Path, name: str) -> tuple[float, dict[str, float], float]:
    """TRL's loss and metrics on step 0's batch with transformers' logits, and the gradient norm of that loss
    over the HF model's parameters."""
    import trl_oracle

    pairs, order = _first_batch(d, *DATASETS.get(name, ()))
    model.zero_grad()
    batch = _trl_batch(model, pairs, order, model if name.startswith("dpo") else None)
    if name.startswith("dpo"):
        loss, metrics = trl_oracle.trl_dpo_loss(batch, **RPO)
    elif name == "simpo":
        loss, metrics = trl_oracle.trl_simpo_loss(batch, beta=2.0, gamma=0.5, label_smoothing=0.0, sft_weight=0.25)
    else:
        loss, metrics = trl_oracle.trl_orpo_loss(batch, beta=0.1)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad()
    return float(loss), {k: float(v) for k, v in metrics.items()}, float(norm)


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo", "orpo_sequence", "dpo_two"])
def test_first_preference_step_equals_transformers_and_trl(trained, name):
    model, d, _ = trained
    first = read_metrics(d / name)[0]
    loss, metrics, grad_norm = _trl_first_step(model, d, name)
    if name == "orpo":
        # TRL's ORPO NLL also covers the prompt tokens, ShardForge's by default the response only
        # (orpo_sequence's covers both): the odds-ratio term (loss minus NLL) and the metrics compare
        assert first["loss"] - first["nll_loss"] == pytest.approx(loss - metrics["nll_loss"], rel=1e-5)
    else:
        assert first["loss"] == pytest.approx(loss, rel=1e-5)
        assert first["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    compared = [("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                ("reward_margin", "rewards/margins"), ("logps_chosen", "logps/chosen"),
                ("logps_rejected", "logps/rejected")]
    if not name.startswith("dpo"):  # DPO's step-0 rewards are zero up to rounding, which decides its accuracy
        compared.append(("reward_accuracy", "rewards/accuracies"))
    if name == "orpo_sequence":
        compared.append(("nll_loss", "nll_loss"))
    for ours, theirs in compared:
        assert first[ours] == pytest.approx(metrics[theirs], rel=1e-5, abs=1e-5), ours


def test_one_dpo_step_equals_torch_adamw_on_trl_loss(trained):
    """After one step from the imported model, the DPO run's weights (exported to HF by launcher.convert and
    loaded by transformers) equal the HF model's after TRL's loss on the same batch, backward, gradient
    clipping and torch's AdamW with the same hyperparameters (no weight decay on 1-D weights, as
    megatron-core's optimizer) within 1e-5; its evaluation on another dataset's pairs equals TRL's loss of
    that stepped model."""
    import copy

    import trl_oracle

    model, d, _ = trained
    policy = copy.deepcopy(model).train()
    pairs, order = _first_batch(d)
    loss, _ = trl_oracle.trl_dpo_loss(_trl_batch(policy, pairs, order, policy), **RPO)
    loss.backward()
    o = STEP_OPTIM
    torch.nn.utils.clip_grad_norm_(policy.parameters(), o["clip_grad"])
    params = list(policy.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": o["weight_decay"]},
              {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]
    torch.optim.AdamW(groups, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"]).step()
    exported = transformers.AutoModelForCausalLM.from_pretrained(d / "dpo_step_hf", dtype=torch.float32)
    expected, got, before = policy.state_dict(), exported.state_dict(), model.state_dict()
    assert set(got) == set(expected)
    moved = max(float((expected[k] - before[k]).abs().max()) for k in expected)
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert moved > 1e-3 and worst < 1e-5, (moved, worst)
    assert read_metrics(d / "dpo_step")[0]["loss"] == pytest.approx(float(loss), rel=1e-5)

    # the evaluation after that step: TRL's loss of the stepped model on the validation dataset's first batch,
    # the initial model its reference
    pairs, order = _first_batch(d, "pairs_valid")
    with torch.no_grad():
        valid_loss, _ = trl_oracle.trl_dpo_loss(_trl_batch(policy, pairs, order, model), **RPO)
    [evaluation] = read_metrics(d / "dpo_step", type="eval")
    assert (evaluation["step"], evaluation["eval_tokens"]) == (1, len(order))  # eval_tokens: pairs
    assert "eval_ppl" not in evaluation  # (a mean over pairs has no perplexity)
    assert evaluation["eval_loss"] == pytest.approx(float(valid_loss), rel=1e-5)


def _switch_aux_loss(router_logits: torch.Tensor, experts: int, topk: int, coeff: float) -> torch.Tensor:
    """megatron-core's load-balancing loss of one layer over one micro batch's T tokens (Switch Transformer):
    E·coeff / (topk·T²) · Σ_e (Σ_x p(x, e))·(tokens routed to e), p the softmax over all experts."""
    probs = torch.softmax(router_logits.float(), -1)
    routed = torch.zeros(experts).index_add_(0, probs.topk(topk).indices.reshape(-1), torch.ones(probs.shape[0] * topk))
    tokens = probs.shape[0]
    return experts * coeff / (topk * tokens * tokens) * (probs.sum(0) * routed).sum()


def test_moe_dpo_first_step_equals_transformers_and_trl(trained):
    """DPO from the imported Mixtral: the first step's loss equals TRL's loss of transformers' logits, and its
    gradient norm that of TRL's loss plus the load-balancing loss of each micro batch (one pair: its two rows
    padded to train.seq_length) and layer, from transformers' router logits, averaged over the micro batches."""
    import trl_oracle
    from launcher.data.tokenizer import fill_id, load_tokenizer

    _, d, _ = trained
    model = transformers.AutoModelForCausalLM.from_pretrained(d / "hf_moe", dtype=torch.float32)
    pairs, order = _first_batch(d)
    loss, _ = trl_oracle.trl_dpo_loss(_trl_batch(model, pairs, order, model), **RPO)
    pad = fill_id(load_tokenizer(str(_default_tokenizer())))
    aux = torch.zeros(())
    for k in order:  # train.micro_batch_size=2: one pair a micro batch
        pair = pairs.pair(k)
        rows = torch.full((2, 128), pad, dtype=torch.long)
        for r, ids in enumerate((pair.chosen_ids, pair.rejected_ids)):
            rows[r, :len(ids)] = torch.from_numpy(ids)
        for layer in model(rows, output_router_logits=True).router_logits:
            aux = aux + _switch_aux_loss(layer, MOE_CONFIG["num_local_experts"], MOE_CONFIG["num_experts_per_tok"],
                                         MOE_CONFIG["router_aux_loss_coef"])
    aux = aux / len(order)

    def norm() -> float:
        return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))

    loss.backward(retain_graph=True)
    without_aux = norm()
    aux.backward()
    first = read_metrics(d / "dpo_moe")[0]
    assert first["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert first["grad_norm"] == pytest.approx(norm(), rel=1e-5)
    assert abs(norm() - without_aux) > 1e-3 * without_aux  # the comparison sees the aux loss's weight


PREFERENCE_CURVE = ("loss", "grad_norm", "reward_chosen", "reward_rejected", "reward_margin", "logps_chosen",
                    "logps_rejected", "nll_loss")


def _assert_same_curve(reference: list[dict], other: list[dict], steps: int, *,
                       keys: tuple[str, ...] = PREFERENCE_CURVE, rel: float = 1e-5) -> None:
    """Every step's `keys` of `other` equal `reference`'s (rel, abs 1e-6), over `steps` steps each."""
    assert len(reference) == len(other) == steps
    for a, b in zip(reference, other):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (a["step"], key)


def test_moe_dpo_under_expert_parallelism_equals_the_single_process(trained):
    _, d, _ = trained
    single, ep2 = read_metrics(d / "dpo_moe"), read_metrics(d / "dpo_moe_ep2")
    _assert_same_curve(single, ep2, PREF_STEPS,
                       keys=("loss", "grad_norm", "reward_margin", "logps_chosen", "nll_loss", "moe_aux_loss"))


@pytest.mark.parametrize("name", ["dpo_tp2", "dpo_dp2", "dpo_pp2", "dpo_cp2", "dpo_zero3"])
def test_dpo_layouts_equal_the_single_process(trained, name):
    _, d, _ = trained
    single, other = read_metrics(d / "dpo"), read_metrics(d / name)
    _assert_same_curve(single, other, PREF_STEPS)


@pytest.mark.parametrize("name", ["dpo_live", "dpo_live_pp2", "dpo_zero3_live"])
def test_live_reference_equals_the_precomputed_reference(trained, name):
    """DPO with the frozen reference model forwarded each step (single process, pp=2, ZeRO-3) equals DPO from the
    precomputed reference table over its steps; the live run writes no table."""
    _, d, outputs = trained
    assert "dpo: reference log-probs" not in outputs[name] and not (d / name / "reference_logps").exists()
    precomputed, live = read_metrics(d / "dpo"), read_metrics(d / name)
    tolerance = 1e-6 if name == "dpo_live" else 1e-5  # other layouts against the single process: as elsewhere
    _assert_same_curve(precomputed, live, PREF_STEPS, rel=tolerance)


@pytest.mark.parametrize("name", ["dpo4_vpp", "dpo4_vpp_live"])
def test_dpo_under_the_interleaved_pipeline_equals_the_single_process(trained, name):
    _, d, _ = trained
    single, vpp = read_metrics(d / "dpo4"), read_metrics(d / name)
    _assert_same_curve(single, vpp, PREF_STEPS)
    if name == "dpo4_vpp":
        [table] = (d / "dpo4" / "reference_logps").glob("*.npy")
        [vpp_table] = (d / name / "reference_logps").glob("*.npy")
        np.testing.assert_allclose(np.load(vpp_table), np.load(table), rtol=1e-6)


def test_dpo_resume_reads_the_reference_and_continues_bit_exactly(trained):
    """dpo_saved, resumed after step 2 in its run.dir, reads the reference its start wrote (no second
    pass) and its step 3 is the uninterrupted dpo run's, bit for bit."""
    _, d, outputs = trained
    assert "dpo: reference log-probs" in outputs["dpo_saved"] and "steps=2->3" in outputs["resumed"]
    assert "dpo: reference log-probs" not in outputs["resumed"]
    resumed, straight = read_metrics(d / "dpo_saved"), read_metrics(d / "dpo")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("loss", "grad_norm", "reward_chosen", "reward_margin", "logps_chosen", "nll_loss"):
        assert resumed[2][key] == straight[2][key], key


@pytest.mark.parametrize("name", [name for name, _ in PACKED_OBJECTIVES])
def test_packed_pairs_equal_unpacked(trained, name):
    """The same pairs each step, packed into rows (varlen attention, per-sequence sums over cu_seqlens)
    and one sequence per row: loss, gradient norm and metrics agree within 1e-6 over the steps; DPO's
    reference log-probs are the same table."""
    _, d, _ = trained
    unpacked, packed = read_metrics(d / f"{name}_all"), read_metrics(d / f"{name}_all_packed")
    assert len(unpacked) == len(packed) == PACKED_STEPS
    assert packed[0]["padding_fraction"] < unpacked[0]["padding_fraction"] / 2
    for a, b in zip(unpacked, packed):
        assert a["loss_tokens"] == b["loss_tokens"] == len(_first_batch(d)[0])  # pairs: all of them
    _assert_same_curve(unpacked, packed, PACKED_STEPS, rel=1e-6)
    if name == "dpo":
        [table] = (d / f"{name}_all" / "reference_logps").glob("*.npy")
        [packed_table] = (d / f"{name}_all_packed" / "reference_logps").glob("*.npy")
        np.testing.assert_allclose(np.load(packed_table), np.load(table), rtol=1e-6)


@pytest.mark.parametrize("name", ["dpo_all_packed_pp2", "dpo_all_packed_cp2"])
def test_packed_dpo_layouts_equal_the_single_process(trained, name):
    _, d, _ = trained
    single, other = read_metrics(d / "dpo_all_packed"), read_metrics(d / name)
    _assert_same_curve(single, other, PACKED_STEPS, keys=("loss", "grad_norm", "reward_margin", "logps_chosen",
                                                          "nll_loss"))


def test_live_reference_resume_continues_bit_exactly(trained):
    """dpo_live_saved, resumed after step 2, reads the frozen reference from its checkpoint (the weights it
    trains are no longer the initial ones) and its step 3 is the uninterrupted dpo_live run's, bit for bit."""
    _, d, outputs = trained
    assert "steps=2->3" in outputs["resumed_live"]
    resumed, straight = read_metrics(d / "dpo_live_saved"), read_metrics(d / "dpo_live")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("loss", "grad_norm", "reward_chosen", "reward_margin", "logps_chosen", "nll_loss"):
        assert resumed[2][key] == straight[2][key], key
