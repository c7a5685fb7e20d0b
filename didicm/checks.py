"""Value checks that read a tensor back to the host (NaN, label ranges). On a GPU each one waits for the queue
to drain, so the sync-free training step turns them off around a loss whose inputs its own pipeline produced;
every other caller keeps them and gets a clear error for bad input."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["value_checks_enabled", "without_value_checks"]

_enabled = True


def value_checks_enabled() -> bool:
    return _enabled


@contextmanager
def without_value_checks() -> Iterator[None]:
    """Skip the host-reading checks inside the block (shape and dtype checks stay: they read no tensor)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
