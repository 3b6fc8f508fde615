"""`python -m tests.scripts.eval_reference CHECKPOINT OUT.json [OVERRIDE ...]` (one process): a
checkpoint's eval loss by a plain forward, independent of the engines' eval_step, schedules and
reductions: the model built on its own, the checkpoint's weights loaded, the full logits of each
held-out batch (all its rows at once), torch's cross entropy over the real vocabulary, summed
over the loss-masked tokens and divided by their count. The held-out batches are those of the
training config the overrides compose (launcher.train.build_eval_data). OUT.json gets
{"eval_loss", "eval_tokens"}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from launcher.config.validate import typed
from launcher.generate import forward_logits
from launcher.model_io import build_model, init_world_of_one, load_model_weights, model_args_for, resolve_checkpoint
from launcher.train import build_eval_data
from parallel.megatron_engine import shutdown

CONF = Path(__file__).resolve().parents[2] / "conf"


def main(checkpoint: str, out: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = typed(compose(config_name="config", overrides=overrides))
    valid = build_eval_data(cfg)
    directory = resolve_checkpoint(checkpoint)
    args = model_args_for(directory, None)
    gbs = cfg.train.global_batch_size
    init_world_of_one()
    try:
        model = build_model(args).eval()
        load_model_weights(model, directory, args)
        loss_sum, tokens = torch.zeros((), dtype=torch.float64), 0
        for k in range(cfg.eval.iters):
            (batch,) = valid.microbatches(step=k, dp_rank=0, dp_size=1, micro_batch_size=gbs, global_batch_size=gbs)
            assert "cu_seqlens" not in batch, "the reference reads unpacked rows"
            logits = forward_logits(model, batch["tokens"])[..., :args.vocab_size]
            losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
            mask = batch["loss_mask"].flatten()
            loss_sum += (losses.double() * mask.double()).sum()
            tokens += int(mask.sum())
    finally:
        shutdown()
    Path(out).write_text(json.dumps({"eval_loss": loss_sum.item() / tokens, "eval_tokens": tokens}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
