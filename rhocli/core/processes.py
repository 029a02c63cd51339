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


def stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's Python stack of that rho process to its stderr and
    lets it go on (faulthandler): where a stuck run waits, rank by rank
    (``pkill -USR1 -f rhocli`` for all of them)."""
    import faulthandler

    if not hasattr(signal, "SIGUSR1"):
        return
    try:  # the process's own stderr (a caller's redirected sys.stderr may have no descriptor)
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True, chain=False)
    except (AttributeError, OSError, ValueError):  # no stderr at all (a daemon): nothing to print to
        pass


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


class DeferredSignals:
    """Ctrl-C and SIGTERM that never land inside code that must not be cut in half.

    Python raises KeyboardInterrupt (or ``TerminatedSignal``) between any two bytecodes of the main
    thread. Inside ``concurrent.futures``' own code (``submit`` writing to the executor's wake-up
    pipe, ``Future.result``) that can leave a half-written message in a pipe its manager thread
    reads, which then waits forever and with it the interpreter's exit (seen: ``rho tokenize`` hung
    on Ctrl-C). Within ``with signals:`` (main thread only) the handlers already installed are
    wrapped: a signal outside a ``signals.critical()`` block raises at once as before; one inside is
    held and raised when the block ends.

        with DeferredSignals() as signals:
            with signals.critical():
                future = pool.submit(job)    # never interrupted halfway
            read_more_input()                # interrupted at once (a blocked read included)
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._depth = 0
        self._pending: int | None = None

    def __enter__(self) -> "DeferredSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is signal.SIG_IGN:  # ignored (e.g. under nohup): stays so
                    continue
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self._depth:
            self._pending = self._pending or signum
            return
        self._deliver(signum, frame)

    def _deliver(self, signum, frame) -> None:
        handler = self._previous.get(signum)
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_IGN:
            return
        elif signum == signal.SIGINT and handler is None:  # installed from C code: Python's default
            raise KeyboardInterrupt
        else:  # SIG_DFL: end as the default action would (no clean-up)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    class _Critical:
        def __init__(self, owner: "DeferredSignals") -> None:
            self.owner = owner

        def __enter__(self) -> None:
            self.owner._depth += 1

        def __exit__(self, *exc) -> None:
            owner = self.owner
            owner._depth -= 1
            if owner._depth == 0 and owner._pending is not None:
                signum, owner._pending = owner._pending, None
                owner._deliver(signum, None)

    def critical(self) -> "DeferredSignals._Critical":
        return DeferredSignals._Critical(self)


class SignalsStayWithMainThread:
    """Threads started inside ``with SignalsStayWithMainThread():`` never receive SIGINT or SIGTERM.

    The kernel hands a process-directed signal to any thread that does not block it. When that is a
    helper thread (``concurrent.futures``' manager and queue-feeder threads, an import thread),
    Python's handler is only run by the main thread when it next executes bytecode, and a main
    thread blocked in a read (a pipe, a slow file system) is not woken: Ctrl-C did nothing (seen:
    ``rho tokenize`` on a held input, 2 runs in 25). Threads inherit their creator's signal mask, so
    the main thread blocks both signals while it starts them and restores its mask after; a signal
    sent meanwhile waits and is delivered to the main thread then. Processes forked meanwhile inherit
    the mask too: they unblock it themselves (``unblock_signals``).
    """

    SIGNALS = {signal.SIGINT, signal.SIGTERM}

    def __enter__(self) -> "SignalsStayWithMainThread":
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask"):
            self._previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous)


def unblock_signals() -> None:
    """In a child forked while its parent blocked SIGINT/SIGTERM: take them back."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SignalsStayWithMainThread.SIGNALS)
