"""An offline pretraining corpus: the docstrings of the installed Python standard library.

Every machine that runs Python has it, it is real English prose mixed with code, and it
needs no network. Documents are separated by one blank line ("\\n\\n"); blank lines inside
a docstring are dropped so that separator is unambiguous and `read_documents` recovers
the exact documents (the tokenizer puts EOS between them).
"""
from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

DOC_SEPARATOR = "\n\n"
# Third-party code, test suites (deliberately broken files, fixtures) and the IDE are not
# standard-library prose.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _python_files(root: Path) -> Iterator[Path]:
    """.py files under root in a fixed (sorted) order, so the corpus is byte-identical on re-runs."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath, name)


def _source_order(node: ast.AST) -> Iterator[ast.AST]:
    """Depth-first pre-order, i.e. the order definitions appear in the file (ast.walk is breadth-first)."""
    yield node
    for child in ast.iter_child_nodes(node):
        yield from _source_order(child)


def _clean(docstring: str) -> str:
    # get_docstring already dedents; drop trailing spaces and blank lines (see module docstring).
    return "\n".join(line.rstrip() for line in docstring.splitlines() if line.strip())


def _docstrings(path: Path) -> Iterator[str]:
    try:
        # ast.parse on bytes honours PEP 263 encoding cookies; nothing is imported or executed.
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, RecursionError, OSError):  # ValueError covers decode errors, NUL bytes
        return
    for node in _source_order(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield _clean(doc)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def build_stdlib_corpus(out_path: Path, max_bytes: int) -> Path:
    """Write stdlib docstrings to out_path (UTF-8, documents separated by a blank line), at most max_bytes."""
    out_path = Path(out_path)
    seen: set[str] = set()
    size = 0
    with open(out_path, "wb") as f:
        for path in _python_files(stdlib_root()):
            for doc in _docstrings(path):
                # Exact repeats (overrides that copy their base's docstring) would skew a small corpus.
                if not doc or doc in seen:
                    continue
                seen.add(doc)
                try:
                    data = (DOC_SEPARATOR if size else "").encode() + doc.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates from escapes in a literal
                    continue
                if size + len(data) > max_bytes:
                    return out_path
                f.write(data)
                size += len(data)
    return out_path


def read_documents(corpus_path: Path) -> list[str]:
    """The documents of a corpus written by build_stdlib_corpus, in order."""
    text = Path(corpus_path).read_text(encoding="utf-8")
    return text.split(DOC_SEPARATOR) if text else []
