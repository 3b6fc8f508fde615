"""What a training run prints: its own lines (the start-up line, the progress bar, saves, errors)
and real warnings, not the libraries' chatter, unless `logging.verbose=true`.

Quiet (the default) means: Python logging below WARNING is dropped (megatron-core logs its whole
DDP and optimizer configs, every parameter name of each gradient bucket and its scheduler's
settings at INFO; setuptools logs each compiler call of a DeepSpeed op build at INFO), and
deprecation warnings are not shown (torch's collectives warn on every DeepSpeed step, which
breaks the progress bar, and megatron-core's config deprecations repeat on every start). Nothing
of ShardForge's own goes through logging, so nothing of it is lost.
"""
from __future__ import annotations

import logging
import warnings

# (category, message regex): what quiet mode hides; other warnings still print.
QUIET_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (DeprecationWarning, ""),
    (FutureWarning, ""),
    (UserWarning, r".*is deprecated"),  # megatron-core's TransformerConfig notes
    # megatron-core's distributed optimizer reads `.grad` of its non-leaf shard views in zero_grad
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
)


def configure(verbose: bool) -> None:
    """Quiet or verbose console for this process; a later call with the other value undoes it
    (its filters go in front of the earlier ones)."""
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("default" if verbose else "ignore", message=message, category=category)
