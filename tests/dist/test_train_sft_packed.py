"""End to end through the CLI: preprocess chat data, train SFT with packed rows; every layout
gives the single-process per-step loss, and metrics report the padding the packing left."""
from __future__ import annotations

import json

import pytest
from tiny_tokenizers import SENTENCES, train_sp

from conftest import run_cli, train_runs


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    tokenizer = train_sp(d)
    convs = [{"messages": [{"role": "user", "content": SENTENCES[i % 6][: 10 + 7 * (i % 4)]},
                           {"role": "assistant", "content": SENTENCES[(i * 5) % 6][: 8 + 9 * (i % 5)]}]}
             for i in range(64)]
    (d / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    run_cli("launcher.preprocess", [f"input={d / 'chat.jsonl'}", f"output_prefix={d / 'chat'}",
                                    f"tokenizer={tokenizer}", "format=sft"])
    return [f"data.prefixes=[{d / 'chat'}]", f"data.tokenizer={tokenizer}"]


LAYOUTS = [("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"]), ("dp2", [])]


@pytest.fixture(scope="module")
def trained(sft_data, tmp_path_factory) -> dict[str, list[dict]]:
    """Packed SFT in one process and in each 2-rank layout, and unpacked ("padded") in one process."""
    common = ["data=indexed", *sft_data, "data.format=sft", "train.seq_length=256", "train.global_batch_size=4",
              "train.micro_batch_size=2", "train.steps=4", "optim.warmup_steps=1", "logging.wandb.mode=disabled",
              "logging.progress=false", "checkpoint.final_save=false"]
    packed = [*common, "data.packing=true"]
    return train_runs(tmp_path_factory.mktemp("sft_runs"), [
        ("single", packed, 1), ("padded", [*common, "data.packing=false"], 1),
        *[(name, [*packed, *extra], 2) for name, extra in LAYOUTS]])


def test_packed_sft_parity_across_layouts(trained):
    ref = trained["single"]
    assert 0 < ref[0]["padding_fraction"] < 0.5
    assert ref[0]["samples_per_row"] > 1.5  # several conversations share a row
    assert all(m["loss_tokens"] < 4 * 256 for m in ref)  # only assistant tokens carry loss
    for name, _ in LAYOUTS:
        got = trained[name]
        for a, b in zip(ref, got):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (name, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (name, a["step"])
            assert b["loss_tokens"] == a["loss_tokens"]
            # the step's whole global batch, whatever the layout (not rank 0's share of it)
            assert (b["padding_fraction"], b["samples_per_row"]) == (a["padding_fraction"], a["samples_per_row"])


def test_unpacked_sft_pads_more(trained):
    assert trained["padded"][0]["padding_fraction"] > trained["single"][0]["padding_fraction"]
