"""Run several `launcher.convert import_hf` jobs in one process (saves a megatron import per job).

    import_many HF_DIR=OUT_DIR [HF_DIR=OUT_DIR ...]
Each job is exactly `python -m launcher.convert import_hf hf_dir=HF_DIR out=OUT_DIR name=test_<family>`
where <family> is HF_DIR's name up to the first '_'.
"""
from __future__ import annotations

import sys
from pathlib import Path

from launcher.convert import main as convert_main


def main() -> None:
    for job in sys.argv[1:]:
        hf_dir, out = job.split("=", 1)
        family = Path(hf_dir).name.split("_")[0]
        if convert_main(["import_hf", f"hf_dir={hf_dir}", f"out={out}", f"name=test_{family}"]) != 0:
            sys.exit(2)


if __name__ == "__main__":
    main()
