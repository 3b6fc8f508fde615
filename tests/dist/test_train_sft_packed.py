"""End to end through the CLI: preprocess chat data, train SFT with packed rows; every layout
gives the single-process per-step loss and eval loss (on held-out conversations), and metrics
report the padding the packing left."""
from __future__ import annotations

import json

import pytest
from tiny_tokenizers import SENTENCES, train_sp

from conftest import read_metrics, run_cli, train_runs


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    tokenizer = train_sp(d)
    convs = [{"messages": [{"role": "user", "content": SENTENCES[i % 6][: 10 + 7 * (i % 4)]},
                           {"role": "assistant", "content": SENTENCES[(i * 5) % 6][: 8 + 9 * (i % 5)]}]}
             for i in range(128)]
    (d / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    run_cli("launcher.preprocess", [f"input={d / 'chat.jsonl'}", f"output_prefix={d / 'chat'}",
                                    f"tokenizer={tokenizer}", "format=sft"])
    return [f"data.prefixes=[{d / 'chat'}]", f"data.tokenizer={tokenizer}"]


LAYOUTS = [("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"]), ("dp2", []),
           # each conversation padded to a multiple of 2·cp and split over the CP ranks per conversation
           ("cp2_ring", ["parallel.cp=2", "parallel.cp_mode=ring"]),
           ("cp2_allgather", ["parallel.cp=2", "parallel.cp_mode=allgather"])]


@pytest.fixture(scope="module")
def trained(sft_data, tmp_path_factory) -> dict[str, list[dict]]:
    """Packed SFT in one process and in each 2-rank layout, and unpacked ("padded") in one process."""
    common = ["data=indexed", *sft_data, "data.format=sft", "train.seq_length=256", "train.global_batch_size=4",
              "train.micro_batch_size=2", "train.steps=4", "optim.warmup_steps=1", "logging.wandb.mode=disabled",
              "logging.progress=false", "checkpoint.final_save=false",
              "data.split=75/25", "eval.every=2", "eval.iters=2"]  # a quarter of the conversations held out
    packed = [*common, "data.packing=true"]
    base = tmp_path_factory.mktemp("sft_runs")
    runs = [("single", packed, 1), ("padded", [*common, "data.packing=false"], 1),
            *[(name, [*packed, *extra], 2) for name, extra in LAYOUTS]]
    metrics = train_runs(base, runs)
    return {**metrics, **{f"{name}/eval": read_metrics(base / name, type="eval") for name, *_ in runs}}


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


@pytest.mark.parametrize("name", [x[0] for x in LAYOUTS])
def test_packed_sft_eval_loss_matches_single_process(name, trained):
    reference, got = trained["single/eval"], trained[f"{name}/eval"]
    assert [e["step"] for e in got] == [e["step"] for e in reference] == [2, 4]
    assert 0 < reference[0]["eval_tokens"] < 2 * 4 * 256  # assistant tokens of the held-out conversations only
    for ref, e in zip(reference, got):
        assert e["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6), e["step"]
        assert e["eval_tokens"] == ref["eval_tokens"]


def test_unpacked_sft_pads_more(trained):
    assert trained["padded"][0]["padding_fraction"] > trained["single"][0]["padding_fraction"]
