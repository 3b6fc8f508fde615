"""Run several `launcher.convert import_hf` jobs in one process (saves a megatron import per job).

    import_many HF_DIR=OUT_DIR [HF_DIR=OUT_DIR ...]
Each job is what `python -m launcher.convert import_hf hf_dir=HF_DIR out=OUT_DIR name=test_<family>`
runs after parsing its command line, where <family> is HF_DIR's name up to the first '_'.
"""
from __future__ import annotations

import sys
from pathlib import Path

from launcher.convert import import_hf


def main() -> None:
    for job in sys.argv[1:]:
        hf_dir, out = job.split("=", 1)
        family = Path(hf_dir).name.split("_")[0]
        import_hf(Path(hf_dir), Path(out), name=f"test_{family}")


if __name__ == "__main__":  # dist_checkpointing's writer may spawn processes: keep this guard
    main()
