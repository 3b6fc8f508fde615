"""Hugging Face import/export of mixture-of-experts models against `transformers` itself (CPU, fp32,
no downloads): Mixtral, Qwen2-MoE (gated shared expert, q/k/v bias, a dense layer between MoE
layers) and Qwen3-MoE (qk-norm, renormalized top-k).

Small random models are built from configs here and saved as sharded safetensors; `launcher.convert
import_hf` turns them into ShardForge checkpoints, which are loaded in one process (ep=1) and under
ep=2 (torchrun, gloo) and must reproduce transformers' logits and greedy tokens; `export_hf` must
give back a directory transformers loads to the same logits.
"""
from __future__ import annotations

import json

import pytest
import torch

from models import hf_mapping as hfm
from conftest import run_many, tiny_hf_model

transformers = pytest.importorskip("transformers")

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             bos_token_id=None, eos_token_id=None, pad_token_id=None, max_position_embeddings=512,
             # larger than the default 0.02: peaked router and output logits make routing and
             # greedy decoding sharp tests
             initializer_range=0.15)
FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(vocab_size=384, intermediate_size=96, num_local_experts=4,
                                      num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False)),
    # softmax over all experts without renormalizing the top k; layer 1 is a dense MLP
    "qwen2moe": ("Qwen2MoeConfig", dict(vocab_size=1000, intermediate_size=80, moe_intermediate_size=48,
                                        shared_expert_intermediate_size=72, num_experts=4, num_experts_per_tok=2,
                                        norm_topk_prob=False, mlp_only_layers=[1], tie_word_embeddings=True)),
    "qwen3moe": ("Qwen3MoeConfig", dict(vocab_size=300, head_dim=32, intermediate_size=80, moe_intermediate_size=48,
                                        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                        tie_word_embeddings=False)),
}
LAYOUTS = ["1", "1:2"]  # tp=1 in one process's worth of ranks; ep=2 (experts split over the 2 ranks)
MAX_NEW = 8


def _hf_model(family: str):
    config_cls, extra = FAMILIES[family]
    return tiny_hf_model(family, config_cls, **SHAPE, **extra)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, cache_env):
    """Per family: HF dir, imported checkpoint, reference logits/greedy tokens; a training checkpoint;
    the ShardForge results in each of LAYOUTS; and every export the tests check (root/export/<name>).
    Three launches (a tiny CPU run costs mostly its start-up): the imports, torchrun with 2 ranks
    that trains and then computes the logits, the exports."""
    root = tmp_path_factory.mktemp("moe_hf")
    trained_tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    data: dict[str, dict] = {"trained": dict(ckpt=root / "trained" / "checkpoints", tokens=trained_tokens)}
    cases = [dict(name="trained", checkpoint=str(data["trained"]["ckpt"]), tokens=trained_tokens.tolist(),
                  prompt=[1, 2, 3], max_new_tokens=2)]
    imports = []
    for family in FAMILIES:
        model = _hf_model(family)
        hf_dir, ckpt = root / f"{family}_hf", root / f"{family}_ckpt"
        model.save_pretrained(hf_dir, max_shard_size="200KB")  # several shards + index
        tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        prompt = tokens[0, :6].tolist()
        with torch.no_grad():
            logits = model(tokens).logits
            greedy = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW,
                                    min_new_tokens=MAX_NEW)[0, len(prompt):].tolist()
        data[family] = dict(model=model, hf_dir=hf_dir, ckpt=ckpt, tokens=tokens, logits=logits, greedy=greedy)
        imports.append(f"{hf_dir}={ckpt}")
        cases.append(dict(name=family, checkpoint=str(ckpt), tokens=tokens.tolist(), prompt=prompt,
                          max_new_tokens=MAX_NEW))
    run_many([["tests.scripts.import_many", *imports]])
    (root / "cases.json").write_text(json.dumps(cases))
    # A training checkpoint (model + both chained optimizers' state) saved under ep=2, then the logits.
    run_many([["launcher.train", "model=mixtral_tiny", "parallel.ep=2", "train.steps=1", "train.seq_length=32",
               "train.global_batch_size=2", "train.micro_batch_size=1", "logging.wandb.mode=disabled",
               "logging.progress=false", f"run.dir={root / 'trained'}"],
              ["tests.scripts.hf_logits", str(root / "out.pt"), str(root / "cases.json"), ",".join(LAYOUTS)]], nproc=2)
    run_many([*(["launcher.convert", "export_hf", f"checkpoint={data[family]['ckpt']}", f"out={root / 'export' / family}",
                 "max_shard_size_mb=0.2"] for family in FAMILIES),
              ["launcher.convert", "export_hf", f"checkpoint={data['trained']['ckpt']}",
               f"out={root / 'export' / 'trained'}"]])
    results = torch.load(root / "out.pt")
    return data, {(str(layout), name): value for (layout, name), value in results.items()}, root / "export"


@pytest.mark.parametrize("layout", LAYOUTS, ids=["ep1", "ep2"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_moe_matches_transformers(converted, family, layout):
    data, results, _ = converted
    ours, ref = results[(layout, family)], data[family]
    assert ours["logits"].shape == ref["logits"].shape
    diff = (ours["logits"] - ref["logits"]).abs().max().item()
    assert diff < 1e-4, f"{family} {layout}: max |logit diff| {diff:.2e}"
    assert ref["logits"].std() > 0.1  # not a comparison between near-constant logits
    assert ours["cached"] == ours["recomputed"] == ref["greedy"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_export_reloads_in_transformers(converted, family):
    data, _, exports = converted
    entry, out = data[family], exports / family
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(entry["model"])
    original = entry["model"].state_dict()
    assert sorted(reloaded.state_dict()) == sorted(original)
    for name, tensor in original.items():  # every expert, router and shared-expert tensor in its place
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():
        diff = (reloaded(entry["tokens"]).logits - entry["logits"]).abs().max().item()
    assert diff < 1e-5, f"{family}: exported model's logits differ by {diff:.2e}"


def test_export_of_an_expert_parallel_training_checkpoint(converted):
    """transformers computes from the export what ShardForge computes from the checkpoint (ep=1 and ep=2)."""
    data, results, exports = converted
    entry, out = data["trained"], exports / "trained"
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        logits = model(entry["tokens"]).logits
    for layout in LAYOUTS:
        diff = (results[(layout, "trained")]["logits"] - logits).abs().max().item()
        assert diff < 1e-4, f"{layout}: {diff:.2e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_config_round_trip(family):
    config_cls, extra = FAMILIES[family]
    hf_config = getattr(transformers, config_cls)(**SHAPE, **extra).to_dict()
    arch = f"{config_cls[:-len('Config')]}ForCausalLM"
    hf_config["architectures"] = [arch]
    args = hfm.args_from_hf_config(hf_config, family)
    assert args.num_experts == 4 and args.moe_router_topk == 2
    assert args.moe_router_pre_softmax == (family == "qwen2moe")  # no top-k renormalization
    assert args.moe_layer_pattern() == ([1, 0] if family == "qwen2moe" else [1, 1])
    assert bool(args.moe_shared_expert_intermediate_size) == args.moe_shared_expert_gate == (family == "qwen2moe")
    assert hfm.default_architecture(args) == arch
    back = hfm.hf_config_from_args(args, arch)
    assert hfm.args_from_hf_config(back, family) == args
    getattr(transformers, config_cls)(**back)  # transformers accepts it


def test_moe_export_refuses_what_hf_cannot_compute():
    from models.args import ModelArgs
    import yaml

    from conftest import REPO

    cfg = yaml.safe_load((REPO / "conf" / "model" / "mixtral_tiny.yaml").read_text())
    sigmoid = ModelArgs.from_config({**cfg, "moe_router_score_function": "sigmoid",
                                     "moe_router_enable_expert_bias": True})
    with pytest.raises(hfm.HFMappingError, match="moe_router_score_function=sigmoid; moe_router_enable_expert_bias"):
        hfm.hf_config_from_args(sigmoid, "MixtralForCausalLM")
    dense_arch = ModelArgs.from_config(cfg)
    with pytest.raises(hfm.HFMappingError, match="mixture of experts"):
        hfm.hf_config_from_args(dense_arch, "LlamaForCausalLM")
    with pytest.raises(hfm.HFMappingError, match="gated shared expert"):
        hfm.hf_config_from_args(ModelArgs.from_config({**cfg, "add_qkv_bias": True}), "Qwen2MoeForCausalLM")
