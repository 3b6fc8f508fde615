"""The packed, LoRA and DPO benches build their ShardForge runs through bench_train.launch_command: each
command, from the bench's default args, carries the bench's data (and LoRA or DPO) settings, and a user's
--sf-override comes last so it wins."""
from __future__ import annotations

from pathlib import Path

from bench import bench_dpo, bench_lora, bench_packed

PREFIX, TOKENIZER, RUN = Path("/w/chat"), "/w/tok.model", Path("/w/run")


def _data(packing: bool) -> list[str]:
    return ["data=indexed", f"data.prefixes=[{PREFIX}]", f"data.tokenizer={TOKENIZER}",
            f"data.packing={str(packing).lower()}"]


def test_packed_command():
    a = bench_packed.parser().parse_args([])
    for packing in (False, True):
        cmd = bench_packed.sft_command(a, PREFIX, TOKENIZER, RUN, packing)
        assert cmd[1:3] == ["-m", "launcher.train"]
        assert {*_data(packing), "data.format=sft", f"model={a.model}", f"train.seq_length={a.seq_length}",
                f"train.global_batch_size={a.micro_batch_size}", f"run.dir={RUN}"} <= set(cmd)


def test_lora_command_puts_user_overrides_last():
    a = bench_lora.parser().parse_args(["--sf-override", "lora.rank=8"])
    full = bench_lora.lora_command(a, PREFIX, TOKENIZER, RUN, False)
    assert {*_data(True), "data.format=sft"} <= set(full) and "train.peft=lora" not in full
    assert full[-1] == "lora.rank=8"
    lora = bench_lora.lora_command(a, PREFIX, TOKENIZER, RUN, True)
    assert {*_data(True), "data.format=sft", "train.peft=lora", f"lora.alpha={a.alpha}",
            "lora.targets=[qkv,proj,fc1,fc2]"} <= set(lora)
    assert lora[-1] == "lora.rank=8" and lora.index(f"lora.rank={a.rank}") < len(lora) - 1


def test_dpo_command():
    a = bench_dpo.parser().parse_args([])
    cmd = bench_dpo.dpo_command(a, PREFIX, TOKENIZER, RUN, False, a.seq_length // 2, 2 * a.micro_batch_size)
    assert {*_data(False), "train.objective=dpo", "dpo.beta=0.1", f"train.seq_length={a.seq_length // 2}",
            f"train.micro_batch_size={2 * a.micro_batch_size}",
            f"train.global_batch_size={2 * a.micro_batch_size}"} <= set(cmd)
