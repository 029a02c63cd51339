"""One module per stage of the ``rho`` command; ``stage`` wraps each command function."""

from __future__ import annotations

import functools


def stage(fn):
    """Wrap a command so Ctrl-C becomes ``Interrupted`` and SIGTERM ``Terminated`` (Typer would exit
    silently on the first, Python dies on the second without cleaning up): clean-ups run, staged
    outputs are removed, and the user reads one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import signal

        from rhocli.core.processes import TerminatedSignal, terminate_as_interrupt

        previous = terminate_as_interrupt()
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            from rhocli.core.errors import Interrupted

            raise Interrupted("interrupted; only complete outputs are published") from None
        except TerminatedSignal:
            from rhocli.core.errors import Terminated

            raise Terminated("terminated (SIGTERM); only complete outputs are published") from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper
