"""logging.verbose: the libraries' console chatter (megatron-core's INFO logs, deprecation warnings)
is off by default and back with verbose=true (a run's own console: tests/e2e/test_default_run.py)."""
from __future__ import annotations

import logging
import warnings

import pytest

from launcher import console


@pytest.fixture
def restore_console():
    root = logging.getLogger().level
    with warnings.catch_warnings():
        yield
    logging.getLogger().setLevel(root)


def _shown(category: type[Warning], message: str) -> bool:
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn(message, category)
    return bool(seen)


def test_quiet_by_default_and_verbose_on_request(restore_console):
    optimizer_log = logging.getLogger("megatron.core.optimizer")
    warnings.simplefilter("always")  # as if nothing else filtered them
    console.configure(verbose=False)
    assert not optimizer_log.isEnabledFor(logging.INFO)  # "Setting up optimizer with config ..."
    assert optimizer_log.isEnabledFor(logging.WARNING)
    assert not _shown(FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated")
    assert not _shown(UserWarning, "full scope is deprecated. Use empty cuda_graph_scope")
    assert _shown(UserWarning, "something a user must see")
    console.configure(verbose=True)
    assert optimizer_log.isEnabledFor(logging.INFO)
    assert _shown(FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated")
    console.configure(verbose=False)  # again quiet: the later call wins (several runs in one process)
    assert not _shown(FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated")


def test_verbose_is_off_by_default():
    from launcher.config.schema import LoggingConfig

    assert LoggingConfig().verbose is False
