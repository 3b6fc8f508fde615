"""Every command line (launcher.train, convert, generate, preprocess, submit, ...) goes through one
front end, launcher.cli.hydra_command: `--help` says what the command does and which keys it takes,
and a bad command line is one `config error: <key>: <reason>` line with exit status 2, before Hydra
creates any directory. All in-process: `main(argv)` is what the console scripts call."""
from __future__ import annotations

import ast
import importlib

import pytest

from conftest import REPO, main_in_process


def entry_point_modules() -> list[str]:
    """Modules under launcher/ that define a top-level `main`: the commands."""
    found = []
    for path in sorted((REPO / "launcher").rglob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            found.append(".".join(path.relative_to(REPO).with_suffix("").parts))
    return found


def console_scripts() -> dict[str, str]:
    """setup.py's console_scripts: script name -> "module:function"."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    return dict(item.value.split("=", 1) for item in value.elts)
    raise AssertionError("setup.py has no console_scripts")


def test_every_entry_point_is_a_hydra_command_with_a_console_script():
    modules = entry_point_modules()
    assert {"launcher.train", "launcher.convert", "launcher.generate", "launcher.preprocess",
            "launcher.submit"} <= set(modules)
    for name in modules:
        module = importlib.import_module(name)
        assert getattr(module.main, "hydra_command", None), f"{name}.main is not wrapped by launcher.cli.hydra_command"
        assert "@hydra.main" not in (REPO / (name.replace(".", "/") + ".py")).read_text(), name
    scripts = console_scripts()
    assert {target for target in scripts.values()} == {f"{m}:main" for m in modules}
    for script, target in scripts.items():
        assert script == "shardforge-" + target.removeprefix("launcher.").removesuffix(":main"), script


@pytest.mark.parametrize("module,argv,words", [
    ("launcher.train", ["--help"], ["python -m launcher.train", "model=tiny", "llama3_1b", "train:", "steps=200",
                                    "logging:"]),
    ("launcher.submit", ["-h"], ["cluster=slurm", "submit:", "dry_run=false"]),
    ("launcher.preprocess", ["--help"], ["jsonl/parquet", "output_prefix: ???", "workers: 1"]),
    ("launcher.generate", ["--help"], ["greedy", "max_new_tokens: 32", "checkpoint:"]),
    ("launcher.convert", ["export_hf", "--help"], ["export_hf", "max_shard_size_mb: 2000"]),
    ("launcher.convert", ["--help"], ["import_hf hf_dir=", "zero_to_megatron"]),
])
def test_help_says_what_the_command_does_and_its_keys(module, argv, words, capsys):
    status, out, err = main_in_process(module, argv, capsys)
    assert status == 0 and not err, err
    for word in words:
        assert word in out, (word, out)
    assert len(out.splitlines()) < 150  # short enough to read


def test_help_works_for_every_entry_point(capsys):
    for name in entry_point_modules():
        status, out, _ = main_in_process(name, ["--help"], capsys)
        assert status == 0 and importlib.import_module(name).__doc__.strip().splitlines()[0] in out, name


BAD = [
    # module, argv, key named, words of the reason
    ("launcher.train", ["data=indexed", "data.prefixes=path", "data.tokenizer=t"], "data.prefixes",
     "a list: write data.prefixes=[path]"),
    ("launcher.train", ["optim.lr=3e-4x"], "optim.lr", "'3e-4x' is not a float"),
    ("launcher.train", ["train.steps=many"], "train.steps", "'many' is not an int"),
    ("launcher.train", ["data=indexed"], "data.prefixes", "must be set"),
    ("launcher.train", ["data.prefixes=[a"], "data.prefixes", "cannot parse"),
    ("launcher.train", ["train.stepz=5"], "train.stepz", "unknown key (did you mean train.steps?)"),
    ("launcher.train", ["+train.stepz=5"], "train.stepz", "unknown key (did you mean train.steps?)"),
    ("launcher.train", ["+stepz=5"], "stepz", "unknown key"),
    ("launcher.train", ["model=nope"], "model", "no option 'nope' (options: deepseek_v2_lite_like,"),
    ("launcher.train", ["parallel.tp=3"], "parallel.tp", "must divide model.num_attention_heads=8"),
    ("launcher.submit", ["cluster=slurm", "+cluster.node=2"], "cluster.node", "did you mean cluster.nodes?"),
    ("launcher.preprocess", ["output_prefix=o", "tokenizer=t"], "input", "must be set"),
    ("launcher.generate", ["checkpoint.load=c", "+promt=hi"], "promt", "did you mean prompt?"),
    ("launcher.convert", ["export_hf", "checkpoint=c", "out=o", "max_shard_size_mb=big"], "max_shard_size_mb",
     "'big' is not a float"),
]


@pytest.mark.parametrize("module,argv,key,words", BAD, ids=[" ".join([m, *a]) for m, a, *_ in BAD])
def test_bad_command_line_is_one_config_error_line(module, argv, key, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever Hydra would create lands here, and must not
    run_dir = [f"run.dir={tmp_path / 'run'}"] if module in ("launcher.train", "launcher.submit") else []
    status, out, err = main_in_process(module, [*argv, *run_dir], capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"config error: {key}: "), err
    assert words in lines[0], lines[0]
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())  # no run dir, no outputs/


def test_unwritable_run_dir_is_one_line_before_anything_is_created(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for run_dir in (blocker / "run", "/proc/shardforge_run"):
        status, _, err = main_in_process("launcher.train", [f"run.dir={run_dir}"], capsys)
        assert status == 2 and err.startswith(f"config error: run.dir: {run_dir} is not writable") \
            and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
