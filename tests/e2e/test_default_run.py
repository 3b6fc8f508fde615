"""The README's main job: `python -m launcher.train` with no overrides trains the tiny model on
the embedded corpus on CPU, with a falling loss, metrics.jsonl, loss.png and a checkpoint."""
from __future__ import annotations

import statistics

from conftest import read_metrics, run_cli


def test_default_job_trains_and_checkpoints(cache_env, tmp_path):
    # The command as a user types it, from a scratch directory: run.dir's default is relative, and
    # a user's own runs/tiny in the checkout is never touched.
    run_dir = tmp_path / "runs" / "tiny"
    proc = run_cli("launcher.train", [], timeout=900, cwd=tmp_path)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 201))
    for key in ("loss", "grad_norm", "lr", "tokens", "tokens_per_s"):
        assert all(key in m for m in metrics), key
    assert metrics[-1]["tokens"] == 200 * 8 * 256
    first, last = statistics.mean(m["loss"] for m in metrics[:10]), statistics.mean(m["loss"] for m in metrics[-10:])
    assert last < first - 2.0, (first, last)  # from ~ln(4096)=8.3 down to well under 6
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000200"
    assert (run_dir / "checkpoints" / "iter_0000200" / "metadata.json").is_file()
    assert "saved checkpoint" in proc.stdout
    # A quiet console (logging.verbose=false): the start-up line, no library chatter before it.
    before_step_1 = proc.stdout.split("shardforge: model=tiny")[0]
    for chatter in ("DistributedDataParallelConfig(", "OptimizerConfig(", "Params for bucket",
                    "decoder.layers.0", "learning rate decay style", "Megatron-FSDP"):
        assert chatter not in proc.stdout, chatter
    assert not before_step_1.strip(), before_step_1
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"  # the run's picture, drawn at its end
    # wandb defaults to offline mode: a local run directory, nothing sent anywhere.
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
