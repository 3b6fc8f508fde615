"""ShardForge: Megatron-style distributed LLM training on megatron-core."""
from setuptools import find_packages, setup

DEEPSPEED = "deepspeed>=0.19.8,<0.20"  # tested: 0.19.8 (CPU accelerator + gloo, torch 2.13 CPU)

setup(
    name="shardforge",
    version="0.1.0",
    description="Megatron-style distributed training (TP/PP/DP on megatron-core) with a Hydra launcher",
    python_requires=">=3.10",
    packages=[*find_packages(include=["launcher", "launcher.*", "parallel", "parallel.*", "models", "models.*"]),
              "launcher.conf", "launcher.slurm"],
    # The Hydra config tree and the Slurm template ship inside the package (launcher/package_data.py
    # finds them there in an installed wheel, and at the top of a source checkout).
    package_dir={"launcher.conf": "conf", "launcher.slurm": "slurm"},
    package_data={"launcher.conf": ["*.yaml", "**/*.yaml"], "launcher.slurm": ["*.sbatch"]},
    # Tested ranges. torch 2.13.0 is the CPU wheel of the dev machines; the GPU machines run 2.11.
    install_requires=[
        "torch>=2.6,<2.14",
        "megatron-core==0.16.1",
        "hydra-core>=1.3.2,<1.4",
        "omegaconf>=2.3,<2.4",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.19",  # Hugging Face tokenizer.json support in launcher.data.tokenizer
        "numpy>=1.26",
        "psutil>=5.9",  # megatron dist_checkpointing writer workers need it (hang without it)
        "safetensors>=0.4",  # launcher.convert reads and writes Hugging Face weights
        "tqdm>=4.66",
        "matplotlib>=3.7",  # loss.png (launcher.plot)
        "wandb>=0.18,<0.32",
        "tensorboard>=2.16",  # logging.tensorboard=true (torch.utils.tensorboard)
    ],
    extras_require={
        # CI runs the DeepSpeed engine's tests too, so dev pulls it in.
        # triton: the torch backend's GPU kernels also run on CPU in Triton's interpreter (tests).
        # trl: the oracle of the preference losses' unit tests, which call its trainers' loss code
        # (private methods, hence the one tested minor version: 1.16.0) without a model.
        # peft: loads the LoRA adapters launcher.convert exports, in their tests (tested: 0.18.1).
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "transformers>=4.45,<6", DEEPSPEED, "triton>=3.3",
                "trl>=1.16,<1.17", "peft>=0.18,<0.19"],
        # parallel.engine=deepspeed (ZeRO-3 + offload). An sdist: its build needs no torch (ops
        # are JIT-built with ninja + a C++ compiler on first use, see README).
        "deepspeed": [DEEPSPEED],
        "hf": ["transformers>=4.45,<6"],  # tokenizers' own chat templates (data.chat_template=tokenizer)
    },
    entry_points={
        "console_scripts": [
            "shardforge-train=launcher.train:main",
            "shardforge-preprocess=launcher.preprocess:main",
            "shardforge-submit=launcher.submit:main",
            "shardforge-convert=launcher.convert:main",
            "shardforge-generate=launcher.generate:main",
            "shardforge-evaluate=launcher.evaluate:main",
            "shardforge-plot=launcher.plot:main",
        ],
    },
)
