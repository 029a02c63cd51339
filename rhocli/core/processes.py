"""Child processes die with their parent, and SIGTERM unwinds like Ctrl-C.

* ``die_with_parent()``: on Linux, ask the kernel to SIGKILL this process when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), so no worker outlives a ``kill -9`` of rho. Called by every child rho
  starts or that is started inside rho: the tokenizer workers (forked), and every multiprocessing
  *spawn* child of a rho process (launched ranks, megatron-core's checkpoint helpers), which
  re-import rho's entry module before they run (``rhocli.app`` calls ``adopt_spawned_child``).
  The signal follows the thread that started the child; rho starts its children from the main thread.
* ``terminate_as_interrupt()``: a SIGTERM handler that raises ``TerminatedSignal`` (a BaseException,
  like KeyboardInterrupt), so ``with``/``finally`` clean-ups run and staged outputs are removed.
"""

from __future__ import annotations

import os
import signal
import sys


class TerminatedSignal(BaseException):
    """SIGTERM arrived (raised in the main thread by ``terminate_as_interrupt``)."""


def die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no libc symbol: nothing to ask for
        return
    if os.getppid() == 1:  # the parent died before the request: do as it would have
        os._exit(1)


def adopt_spawned_child() -> None:
    """In a multiprocessing spawn child (``--multiprocessing-fork`` in argv, multiprocessing's own
    test), die with the parent."""
    if "--multiprocessing-fork" in sys.argv:
        die_with_parent()


def _raise_terminated(signum, frame) -> None:
    raise TerminatedSignal()


def terminate_as_interrupt():
    """Install the SIGTERM handler (main thread only); returns the previous handler, or None."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)
