"""One module per stage of the ``rho`` command; ``stage`` wraps each command function."""

from __future__ import annotations

import functools


def stage(fn):
    """Wrap a command so Ctrl-C becomes ``Interrupted`` (Typer would otherwise exit 130 silently)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            from rhocli.core.errors import Interrupted

            raise Interrupted("interrupted; nothing was written under the output name") from None

    return wrapper
