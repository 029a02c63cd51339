"""The kernels' own error type (imports nothing, so error tables can name it cheaply)."""

from __future__ import annotations


class KernelUnavailableError(RuntimeError):
    """A forced implementation (RHO_KERNEL) cannot run here; the message lists why."""
