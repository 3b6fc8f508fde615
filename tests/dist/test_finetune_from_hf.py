"""Fine-tuning starts from an imported Hugging Face model: `checkpoint.load=<import_hf output>`
loads the weights only (step 0) and the first step's loss equals transformers' loss on the
same batch; under tp=2 as well. The tp=1 run takes its shape from the import (`model=<its dir>`)."""
from __future__ import annotations

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir

from conftest import FAST, REPO, read_metrics, run_many

SHAPE = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
         "num_query_groups": 2, "vocab_size": 4096}
OVERRIDES = [f"model.{k}={v}" for k, v in SHAPE.items()] + [*FAST, "train.steps=1", "checkpoint.final_save=false"]


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

    _, tp1 = run_many([["launcher.convert", "import_hf", f"hf_dir={d / 'hf'}", f"out={d / 'ckpt'}"], train(1)])
    [tp2] = run_many([train(2)], nproc=2)
    return model, d, {"tp1": tp1, "tp2": tp2}


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
