"""Hugging Face import/export and generation against `transformers` itself (CPU, fp32, no downloads).

Small random models of each supported family are built from configs here and saved as sharded
safetensors; `launcher.convert import_hf` turns them into ShardForge checkpoints, which are loaded
under tp=1 and tp=2 (torchrun, gloo) and must reproduce transformers' logits and greedy tokens;
`export_hf` must give back a directory transformers loads to the same logits. The llama family's
vocabulary is padded (777 -> 896 rows): its training loss must be transformers' (the padded rows out
of the softmax) and the padded rows must get no gradient, through both loss paths and a TP-split
vocabulary.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from models import hf_mapping as hfm
from models.args import ModelArgs
from conftest import run_cli, run_many, tiny_hf_model

transformers = pytest.importorskip("transformers")

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             bos_token_id=None, eos_token_id=None, pad_token_id=None,
             # larger than the default 0.02: peaked logits make greedy decoding a sharper test
             initializer_range=0.15)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
FAMILIES: dict[str, tuple[str, dict]] = {
    # Llama-3.1 style: llama3 RoPE scaling, untied output layer, a vocab padded to 896 (the training
    # loss test); gets a tokenizer for the text CLI test
    "llama": ("LlamaConfig", dict(vocab_size=777, max_position_embeddings=16384, rope_parameters=LLAMA3_ROPE,
                                  tie_word_embeddings=False, rms_norm_eps=1e-5)),
    # Qwen2.5 style: q/k/v bias, tied embeddings, vocab not a multiple of 128 (padded)
    "qwen2": ("Qwen2Config", dict(vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen3: per-head q/k RMSNorm, head_dim (32) != hidden / heads (16)
    "qwen3": ("Qwen3Config", dict(vocab_size=300, max_position_embeddings=512, head_dim=32,
                                  tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(vocab_size=384, max_position_embeddings=512, sliding_window=None,
                                      tie_word_embeddings=False)),
}
MAX_NEW = 12
PROMPT_LEN = 6


def _hf_model(family: str):
    config_cls, extra = FAMILIES[family]
    return tiny_hf_model(family, config_cls, **SHAPE, **extra)


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW,
                             min_new_tokens=MAX_NEW)
    return out[0, len(prompt):].tolist()


# A real training run: 1 step under pp=2, its checkpoint with model and distributed optimizer state.
TRAIN = ["parallel.pp=2", "train.steps=1", "train.seq_length=64", "train.global_batch_size=2", "train.micro_batch_size=1",
         "logging.wandb.mode=disabled", "logging.progress=false"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, cache_env):
    """Per family: HF dir, imported checkpoint, reference logits/greedy tokens; plus a training
    checkpoint (TRAIN) and the ShardForge results under tp=1 and tp=2 of all of them. Two launches
    (each costs mostly its start-up): the imports in one process, then torchrun with 2 ranks that
    trains and then computes the logits."""
    root = tmp_path_factory.mktemp("hf")
    run_dir = tmp_path_factory.mktemp("trained")
    trained = run_dir / "checkpoints"
    data: dict[str, dict] = {}
    trained_tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    data["trained"] = dict(ckpt=trained, tokens=trained_tokens)
    batch_imports: list[str] = []
    llama_import: list[str] = []
    cases = [dict(name="trained", checkpoint=str(trained), tokens=trained_tokens.tolist(), prompt=[1, 2, 3],
                  max_new_tokens=2)]
    for family in FAMILIES:
        model = _hf_model(family)
        hf_dir = root / f"{family}_hf"
        model.save_pretrained(hf_dir, max_shard_size="100KB")  # several shards + index
        if family == "llama":
            from tests.tiny_tokenizers import train_hf

            train_hf(hf_dir, chat_template=None, vocab_size=400)
        gen = torch.Generator().manual_seed(len(family))
        tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
        prompt = tokens[0, :PROMPT_LEN].tolist()
        with torch.no_grad():
            logits = model(tokens).logits
        ckpt = root / f"{family}_ckpt"
        if family == "llama":  # the CLI itself once; the others through import_many (same code)
            llama_import = ["launcher.convert", "import_hf", f"hf_dir={hf_dir}", f"out={ckpt}", f"name=test_{family}"]
        else:
            batch_imports.append(f"{hf_dir}={ckpt}")
        labels = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
        data[family] = dict(model=model, hf_dir=hf_dir, ckpt=ckpt, tokens=tokens, logits=logits, prompt=prompt,
                            greedy=_hf_greedy(model, prompt), labels=labels)
        cases.append(dict(name=family, checkpoint=str(ckpt), tokens=tokens.tolist(), prompt=prompt,
                          max_new_tokens=MAX_NEW, **({"labels": labels.tolist()} if family == "llama" else {})))
    run_many([llama_import, ["tests.scripts.import_many", *batch_imports]])
    (root / "cases.json").write_text(json.dumps(cases))
    run_many([["launcher.train", *TRAIN, f"run.dir={run_dir}"],
              ["tests.scripts.hf_logits", str(root / "out.pt"), str(root / "cases.json"), "1,2"]], nproc=2)
    return data, torch.load(root / "out.pt"), root


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_logits_match_transformers(converted, family, tp):
    data, results, _ = converted
    ours, ref = results[(tp, family)]["logits"], data[family]["logits"]
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, f"{family} tp={tp}: max |logit diff| {diff:.2e}"
    assert ref.std() > 0.1  # the comparison is not between near-constant logits


@pytest.mark.parametrize("path", ["unfused tp=1", "fused tp=1", "unfused tp=2"])
def test_training_loss_with_padded_vocab_equals_transformers(converted, path):
    """Step-1 loss of an imported model whose vocabulary is padded equals transformers' loss; the
    padded output rows get exactly zero gradient."""
    data, results, _ = converted
    entry = data["llama"]
    assert ModelArgs(name="x", num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=1,
                     num_query_groups=1, vocab_size=entry["model"].config.vocab_size,
                     max_position_embeddings=8).padded_vocab_size > entry["model"].config.vocab_size
    loss_path, tp = path.split(" tp=")
    result = results[(int(tp), "llama")]
    key = "fused_loss" if loss_path == "fused" else "loss"
    reference = torch.nn.functional.cross_entropy(entry["logits"].flatten(0, 1), entry["labels"].flatten()).item()
    assert result[key] == pytest.approx(reference, rel=1e-5)
    assert result[key.replace("loss", "padded_grad")] == 0.0


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(converted, family, tp):
    data, results, _ = converted
    result = results[(tp, family)]
    assert result["cached"] == result["recomputed"], "KV-cache decoding differs from full recompute"
    assert result["cached"] == data[family]["greedy"]


GENERATE_PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def cli_runs(converted, tmp_path_factory) -> tuple[Path, list[str]]:
    """The export and generate CLI commands the tests below check, in one launch (each command runs as
    its own `python -m` would): export_hf of each family's import (in 0.1 MB shards) to
    <root>/<family> and of the training checkpoint to <root>/trained; then launcher.generate with
    token ids in and out, seeded sampling twice, and text through the tokenizer the checkpoint
    carries (an import's, and a training run's: the README's command), each one's record in
    <root>/<name>.json. Returns root and the generate commands' stdout, in that order."""
    data, _, _ = converted
    root = tmp_path_factory.mktemp("cli")
    qwen, llama = data["qwen2"], data["llama"]
    sampled = ["prompt_ids=5,6,7", "max_new_tokens=16", "temperature=1.5", "top_k=50", "top_p=0.95", "seed=3"]
    exports = [["launcher.convert", "export_hf", f"checkpoint={data[family]['ckpt']}", f"out={root / family}",
                "max_shard_size_mb=0.1"] for family in FAMILIES]
    generates = [
        ["launcher.generate", f"checkpoint.load={qwen['ckpt']}", f"prompt_ids={','.join(map(str, qwen['prompt']))}",
         f"max_new_tokens={MAX_NEW}", f"output_json={root / 'greedy.json'}"],
        *[["launcher.generate", f"checkpoint.load={qwen['ckpt']}/iter_0000000", *sampled,
           f"output_json={root / name}.json"] for name in ("sampled0", "sampled1")],
        ["launcher.generate", f"checkpoint.load={llama['ckpt']}", f"prompt={GENERATE_PROMPT}",
         f"max_new_tokens={MAX_NEW}", "ignore_eos=true", f"output_json={root / 'text.json'}"],
        ["launcher.generate", f"checkpoint.load={data['trained']['ckpt']}", "prompt=Return the", "max_new_tokens=4",
         f"output_json={root / 'trained.json'}"],
    ]
    outputs = run_many([*exports, ["launcher.convert", "export_hf", f"checkpoint={data['trained']['ckpt']}",
                                   f"out={root / 'trained'}"], *generates])
    return root, outputs[len(exports) + 1:]


def test_generate_cli_greedy_sampled_and_text(converted, cli_runs):
    """Token ids in and out, seeded sampling, and text through the tokenizer the checkpoint carries
    (an import's, and a training run's: the README's command)."""
    data, _, _ = converted
    qwen, llama = data["qwen2"], data["llama"]
    root, outputs = cli_runs
    prompt = GENERATE_PROMPT
    results = {name: json.loads((root / f"{name}.json").read_text())
               for name in ("greedy", "sampled0", "sampled1", "text", "trained")}
    assert results["greedy"]["generated_ids"] == qwen["greedy"]

    assert results["sampled0"]["generated_ids"] == results["sampled1"]["generated_ids"]  # seeded: reproducible
    ids = results["sampled0"]["generated_ids"]
    assert len(ids) == 16 and ids[:MAX_NEW] != _hf_greedy(qwen["model"], [5, 6, 7])  # not greedy
    assert all(0 <= t < 1000 for t in ids)  # never a padded-vocab id

    # text in, text out, with the tokenizer import_hf put into the checkpoint
    from launcher.data.tokenizer import SentencePieceTokenizer, load_tokenizer

    tokenizer = load_tokenizer(llama["hf_dir"])
    result = results["text"]
    assert result["prompt_ids"] == tokenizer.encode(prompt)
    assert result["generated_ids"] == _hf_greedy(llama["model"], result["prompt_ids"])
    assert outputs[3].strip().endswith(tokenizer.decode(result["generated_ids"]).strip())

    # a training checkpoint: its own tokenizer (the run's sentencepiece model, BOS first) and shape
    sp = SentencePieceTokenizer(next(Path(os.environ["SHARDFORGE_CACHE"]).glob("stdlib_docs-*/tokenizer.model")))
    result = results["trained"]
    assert result["prompt_ids"] == [sp.bos_id, *sp.encode("Return the")] and len(result["generated_ids"]) > 0
    assert outputs[4].strip().startswith("Return the") and result["text"] == \
        sp.decode(result["prompt_ids"] + result["generated_ids"])[len(sp.decode(result["prompt_ids"])):]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_reloads_in_transformers(converted, cli_runs, family):
    data, _, _ = converted
    entry = data[family]
    out = cli_runs[0] / family
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(entry["model"])
    original = entry["model"].state_dict()
    assert sorted(reloaded.state_dict()) == sorted(original)
    with torch.no_grad():
        diff = (reloaded(entry["tokens"]).logits - entry["logits"]).abs().max().item()
    assert diff < 1e-5, f"{family}: exported model's logits differ by {diff:.2e}"
    if family == "llama":  # tokenizer files travel with the model, its special ids into the configs
        assert (out / "tokenizer.json").is_file()
        fast = transformers.AutoTokenizer.from_pretrained(out)
        assert fast("The quick brown fox")["input_ids"][-4:] == \
            transformers.AutoTokenizer.from_pretrained(entry["hf_dir"])("The quick brown fox")["input_ids"][-4:]
        eos = fast.convert_tokens_to_ids("<|endoftext|>")
        assert reloaded.config.eos_token_id == fast.eos_token_id == eos
        assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == eos


def test_export_of_a_training_checkpoint(converted, cli_runs, cache_env):
    """A pp=2 training checkpoint (optimizer state included) exports with the shape and tokenizer it
    carries; transformers computes what ShardForge computes from that checkpoint under tp=1 and tp=2,
    and knows the tokenizer's special ids without hand edits."""
    data, results, _ = converted
    entry, out = data["trained"], cli_runs[0] / "trained"
    sp_model = next(Path(cache_env).glob("stdlib_docs-*/tokenizer.model"))  # the run's own tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        logits = model(entry["tokens"]).logits
    for tp in (1, 2):
        diff = (results[(tp, "trained")]["logits"] - logits).abs().max().item()
        assert diff < 1e-4, f"tp={tp}: {diff:.2e}"
    from launcher.data.tokenizer import SentencePieceTokenizer

    ours, theirs = SentencePieceTokenizer(sp_model), transformers.AutoTokenizer.from_pretrained(out)
    text = "Return the number of items in a sequence, or raise ValueError."
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    ids = (ours.bos_id, ours.eos_id, ours.pad_id)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == ids
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == ids
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == ids


# ---------------------------------------------------------------------------------------------- bad input


def _one_error_line(proc, prefix: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-3000:]
    return lines[0]


def test_unknown_architecture_is_one_clear_error(converted, tmp_path):
    data, _, _ = converted
    hf_dir = tmp_path / "neox"
    shutil.copytree(data["mistral"]["hf_dir"], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (hf_dir / "config.json").write_text(json.dumps(config))
    proc = run_cli("launcher.convert", ["import_hf", f"hf_dir={hf_dir}", f"out={tmp_path / 'ck'}"], check=False)
    line = _one_error_line(proc, "convert: error:")
    assert "GPTNeoXForCausalLM" in line and all(arch in line for arch in hfm.ARCHITECTURES)
    assert not (tmp_path / "ck").exists()


def test_missing_shard_is_one_clear_error(converted, tmp_path):
    data, _, _ = converted
    hf_dir = tmp_path / "partial"
    shutil.copytree(data["qwen3"]["hf_dir"], hf_dir)
    shard = sorted(hf_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    proc = run_cli("launcher.convert", ["import_hf", f"hf_dir={hf_dir}", f"out={tmp_path / 'ck'}"], check=False)
    line = _one_error_line(proc, "convert: error:")
    assert shard.name in line and "missing" in line


def test_checkpoint_of_another_shape_is_one_clear_error(converted, tmp_path):
    data, _, _ = converted
    other_shape = data["llama"]["ckpt"] / "iter_0000000" / "model.yaml"
    # model= a checkpoint (its shape) here, a yaml path below
    proc = run_cli("launcher.generate", [f"checkpoint.load={data['qwen3']['ckpt']}", f"model={data['llama']['ckpt']}",
                                         "prompt_ids=1,2,3", "max_new_tokens=2"], check=False)
    line = _one_error_line(proc, "generate: error:")
    assert "another model" in line and "model=test_llama" in line
    proc = run_cli("launcher.convert", ["export_hf", f"checkpoint={data['mistral']['ckpt']}", f"model={other_shape}",
                                        f"out={tmp_path / 'x'}"], check=False)
    assert "another model" in _one_error_line(proc, "convert: error:")


# ---------------------------------------------------------------------------------------------- pure mapping


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_round_trip(family):
    config_cls, extra = FAMILIES[family]
    hf_config = getattr(transformers, config_cls)(**SHAPE, **extra).to_dict()
    hf_config["architectures"] = [f"{config_cls[:-len('Config')]}ForCausalLM"]
    args = hfm.args_from_hf_config(hf_config, family)
    assert args.add_qkv_bias == (family == "qwen2") and args.qk_layernorm == (family == "qwen3")
    assert args.rope_scaling == (family == "llama") and args.tie_word_embeddings == extra["tie_word_embeddings"]
    back = hfm.hf_config_from_args(args, hf_config["architectures"][0])
    assert hfm.args_from_hf_config(back, family) == args
    reloaded = getattr(transformers, config_cls)(**back)
    assert reloaded.head_dim == hfm.head_dim(args)


def test_qkv_fuse_split_and_unsupported_configs():
    args = ModelArgs(name="x", num_layers=1, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                     num_query_groups=2, vocab_size=300, max_position_embeddings=64, kv_channels=8)
    q, k, v = torch.randn(64, 64), torch.randn(16, 64), torch.randn(16, 64)
    fused = hfm.fuse_qkv(q, k, v, args)
    # group 0 = q heads 0..3, then k head 0, then v head 0
    assert torch.equal(fused[:32], q[:32]) and torch.equal(fused[32:40], k[:8]) and torch.equal(fused[40:48], v[:8])
    assert all(torch.equal(a, b) for a, b in zip(hfm.split_qkv(fused, args), (q, k, v)))
    base = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=4, vocab_size=300, max_position_embeddings=64)
    # transformers 4.x spelling of a Llama-3.1 config
    legacy = hfm.args_from_hf_config({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}, "x")
    assert (legacy.rotary_base, legacy.rope_scaling, legacy.rope_scaling_factor) == (500000.0, True, 32.0)
    with pytest.raises(hfm.HFMappingError, match="high_freq_factor"):
        hfm.args_from_hf_config({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                          "high_freq_factor": 2.0}}, "x")
    with pytest.raises(hfm.HFMappingError, match="attention_bias"):
        hfm.args_from_hf_config({**base, "attention_bias": True}, "x")
    with pytest.raises(hfm.HFMappingError, match="rope type 'yarn'"):
        hfm.args_from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "x")
    with pytest.raises(hfm.HFMappingError, match="Phi3ForCausalLM"):
        hfm.args_from_hf_config({**base, "architectures": ["Phi3ForCausalLM"]}, "x")


def test_sampling_filters():
    from launcher.generate import _sample

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    gen = torch.Generator().manual_seed(0)
    assert _sample(logits, 0.0, None, None, gen) == 1
    assert {_sample(logits, 5.0, 1, None, gen) for _ in range(20)} == {1}  # top_k=1 is greedy
    assert {_sample(logits, 5.0, None, 1e-6, gen) for _ in range(20)} == {1}  # so is a tiny nucleus
    # top_k=3 keeps exactly the three largest; a high temperature reaches all of them
    assert {_sample(logits, 100.0, 3, None, gen) for _ in range(200)} == {1, 2, 4}
    # top_p=0.5 at temperature 1: token 1 (p≈0.36) alone is short of 0.5, token 2 completes it
    assert {_sample(logits, 1.0, None, 0.5, gen) for _ in range(200)} == {1, 2}
