"""LoRA (train.peft=lora) trains the same adapters in every layout, on top of a frozen base it never
changes. A full-parameter run first makes the base checkpoint; every LoRA run starts from it
(checkpoint.load), fp32 on CPU, lora.dropout=0 and a learning rate at which B is far from zero
after the first step, so the adapters shape the later losses. One launch per world size."""
from __future__ import annotations

import json

import pytest

from conftest import FAST, read_metrics, train_runs

STEPS = 4
LORA = ["train.peft=lora", "lora.rank=4", "lora.alpha=8", "optim.lr=0.01", "optim.warmup_steps=1"]
LAYOUTS = [("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"]), ("dp2", []),
           ("pp2_vpp2", ["parallel.pp=2", "parallel.vpp=2"])]


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_env):
    base = tmp_path_factory.mktemp("lora")
    common = [*FAST, "checkpoint.save_every=0"]
    start = f"checkpoint.load={base / 'pretrain' / 'checkpoints'}"
    lora = [*common, *LORA, f"train.steps={STEPS}", start]
    runs = [("pretrain", [*common, "train.steps=2"], 1),
            ("single", [*lora, "checkpoint.save_every=2"], 1),
            ("resumed", [*lora, f"checkpoint.load={base / 'single' / 'checkpoints' / 'iter_0000002'}"], 1),
            *[(name, [*lora, *extra], 2) for name, extra in LAYOUTS]]
    frozen = ["tests.scripts.lora_frozen_base", str(base / "frozen_tp2.json"), *lora, "train.steps=2",
              "parallel.tp=2", f"run.dir={base / 'frozen_tp2'}"]
    train_runs(base, runs, then=[("frozen_tp2", frozen, 2)])
    return base


@pytest.mark.parametrize("name", [x[0] for x in LAYOUTS])
def test_layout_matches_single_process(base, name):
    reference, got = read_metrics(base / "single"), read_metrics(base / name)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for ref, m in zip(reference, got):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5), m["step"]
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), m["step"]
        assert m["tokens"] == ref["tokens"]


def test_starts_from_the_base_checkpoint(base):
    """B = 0 at the start: the first LoRA loss is the base's loss on that batch, which the
    pretrain run's last step lowered below its own first."""
    pretrain, lora = read_metrics(base / "pretrain"), read_metrics(base / "single")
    assert lora[0]["loss"] < pretrain[0]["loss"] - 0.05
    assert "peft=lora rank=4" in (base / "single" / "stdout.txt").read_text()


def test_resume_is_bit_exact(base):
    full, resumed = read_metrics(base / "single"), read_metrics(base / "resumed")
    assert [m["step"] for m in resumed] == [3, 4]
    for ref, m in zip(full[2:], resumed):
        assert (m["loss"], m["grad_norm"], m["lr"]) == (ref["loss"], ref["grad_norm"], ref["lr"])


def test_checkpoint_holds_the_adapters_and_a_reference_to_the_base(base):
    from megatron.core import dist_checkpointing
    import torch.distributed as dist

    saved = base / "single" / "checkpoints" / "iter_0000004"
    reference = json.loads((saved / "lora.json").read_text())
    pretrain = base / "pretrain" / "checkpoints" / "iter_0000002"
    assert reference["base"] == str(pretrain.resolve())
    assert (reference["rank"], reference["alpha"], reference["targets"]) == (4, 8.0, ["qkv", "proj", "fc1", "fc2"])
    assert reference["base_model"]["name"] == "tiny"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        keys = [k for k in dist_checkpointing.load_tensors_metadata(str(saved)) if not k.endswith("_extra_state")]
    finally:
        dist.destroy_process_group()
    model = [k for k in keys if not k.startswith("optimizer.")]
    assert sorted({k.rsplit(".", 1)[-1] for k in model}) == ["lora_a", "lora_b"], model
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    base_size = sum(f.stat().st_size for f in pretrain.rglob("*") if f.is_file())
    assert size < base_size / 10


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
