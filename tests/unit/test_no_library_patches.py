"""No module outside parallel/compat assigns to an attribute of megatron.core or torch.cuda.

Patches of those libraries live in parallel/compat, version-gated, each with a test that
reproduces the upstream failure it removes. This scans the source (ast) of launcher/, parallel/,
models/ and bench/ for `X.attr = ...` (also augmented / annotated, and setattr / delattr) where X
is a megatron.core module or class, or torch.cuda, however it was imported or aliased.
Attributes of instances (self.x, config.x on a TransformerConfig object) are not patches."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("launcher", "parallel", "models", "bench")
ALLOWED = REPO / "parallel" / "compat"
LIBRARIES = ("megatron.core", "torch.cuda")


def _is_library(dotted: str | None) -> bool:
    return dotted is not None and any(dotted == lib or dotted.startswith(lib + ".") for lib in LIBRARIES)


class _Patches(ast.NodeVisitor):
    """Records the lines assigning to attributes of library objects, in one module."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}  # local name -> dotted path of what it is bound to
        self.lines: list[tuple[int, str]] = []

    def dotted(self, node: ast.AST) -> str | None:
        """The dotted path an expression denotes (`ps.foo` -> megatron.core.parallel_state.foo)."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                and (ast.unparse(node.func).endswith("import_module")):
            return node.args[0].value
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.names[alias.asname] = alias.name
            else:  # `import megatron.core.x` binds `megatron`
                root = alias.name.split(".")[0]
                self.names[root] = root

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.level == 0:
            for alias in node.names:
                self.names[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def bind(self, target: ast.AST, value: ast.AST) -> None:
        """Aliases: `mod = megatron.core.x`, `for mod in (a, b):` over library objects."""
        if isinstance(target, ast.Name):
            if isinstance(value, (ast.Tuple, ast.List)):
                found = [self.dotted(v) for v in value.elts]
                library = [d for d in found if _is_library(d)]
                if library:
                    self.names[target.id] = library[0]
            elif _is_library(self.dotted(value)):
                self.names[target.id] = self.dotted(value)

    def check_target(self, target: ast.AST, line: int) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self.check_target(element, line)
        elif isinstance(target, ast.Attribute) and _is_library(self.dotted(target.value)):
            self.lines.append((line, f"{ast.unparse(target)} = ... ({self.dotted(target.value)})"))

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self.check_target(target, node.lineno)
            self.bind(target, node.value)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.check_target(node.target, node.lineno)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.check_target(node.target, node.lineno)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        self.bind(node.target, node.iter)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") and node.args:
            owner = self.dotted(node.args[0])
            if _is_library(owner):
                self.lines.append((node.lineno, f"{ast.unparse(node)} ({owner})"))
        self.generic_visit(node)


def library_patches(source: str) -> list[tuple[int, str]]:
    """(line, what) for each assignment to an attribute of megatron.core / torch.cuda in `source`."""
    visitor = _Patches()
    visitor.visit(ast.parse(source))
    return sorted(visitor.lines)


def test_scanner_finds_every_form_of_patch():
    source = """
import torch
import megatron.core.tensor_parallel.random as mr
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.optimizer import clip_grads, optimizer
import importlib
from torch import cuda
import megatron.core

torch.cuda.synchronize = lambda: None  # patch
mr.CudaRNGStatesTracker.add = None  # patch
MoEAuxLossAutoScaler.set_loss_scale = staticmethod(print)  # patch
setattr(ps, "x", 1)  # patch
for module in (clip_grads, optimizer):
    module.multi_tensor_scale_impl = None  # patch
alias = importlib.import_module("megatron.core.transformer.attention")
alias.off_interface = None  # patch
cuda.current_device = None  # patch
megatron.core.utils.x, y = 1, 2  # patch
ps.counter += 1  # patch
delattr(mr, "_get_cuda_rng_state")  # patch

class Engine:
    def __init__(self, config):
        self.config = config
        config.gradient_accumulation_fusion = True
        torch.nn.Module.x = 1
        self.stream = torch.cuda.Stream()
"""
    expected = [i for i, text in enumerate(source.splitlines(), 1) if text.endswith("# patch")]
    assert [line for line, _ in library_patches(source)] == expected


def test_no_module_outside_compat_patches_megatron_or_torch_cuda():
    offenders = []
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            if ALLOWED in path.parents:
                continue
            for line, what in library_patches(path.read_text()):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not offenders, ("assignments to megatron.core / torch.cuda attributes outside parallel/compat "
                           "(move each into parallel/compat, with a test of the upstream failure):\n  "
                           + "\n  ".join(offenders))
