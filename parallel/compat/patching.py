"""Replace an attribute of a library object and remember the original, so it can be put back."""
from __future__ import annotations

from typing import Any


class Patches:
    """Attributes replaced on library modules / classes, restored in reverse order by `restore`."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any, bool]] = []

    def set(self, owner: Any, name: str, value: Any) -> Any:
        """owner.name = value; returns the original (what a wrapper delegates to)."""
        had = name in vars(owner)  # the raw entry (a class's staticmethod stays one when put back)
        self._saved.append((owner, name, vars(owner).get(name), had))
        original = getattr(owner, name, None)
        setattr(owner, name, value)
        return original

    def restore(self) -> None:
        for owner, name, original, had in reversed(self._saved):
            if had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._saved.clear()
