"""Reliability mechanisms on their own (fast, no training): the output lock, and where signals land."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from rhocli.core.errors import InUseError
from rhocli.core.lock import OutputLock


def _holder(path) -> subprocess.Popen:
    """Another process holding the lock at ``path`` until killed."""
    code = (f"import time; from rhocli.core.lock import OutputLock; l = OutputLock({str(path)!r}, 'x'); l.acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_is_refused_and_a_dead_holders_is_taken_over(tmp_path):
    path = tmp_path / "run" / ".rho-lock"
    other = _holder(path)
    try:
        with pytest.raises(InUseError, match=rf"^--save run: in use by another rho \(PID {other.pid} on "):
            OutputLock(path, "--save run").acquire()
        assert json.loads(path.read_text())["pid"] == other.pid  # the holder's lock is untouched
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    with OutputLock(path, "--save run") as lock:  # stale: its holder is gone
        assert lock.held and json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_lock_whose_pid_was_reused_is_stale(tmp_path):
    """A PID that runs again, but started after the lock was written, is another process."""
    import socket

    path = tmp_path / ".rho-lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 1.0}))  # this PID, 1970
    with OutputLock(path, "x") as lock:
        assert lock.held


def test_a_lock_from_another_host_is_not_guessed_at(tmp_path):
    path = tmp_path / ".rho-lock"
    path.write_text(json.dumps({"host": "some-other-node", "pid": 1, "started": 1.0}))
    with pytest.raises(InUseError, match="PID 1 on some-other-node.*remove .*rho-lock if no rho runs there"):
        OutputLock(path, "x").acquire()


def test_threads_started_under_signals_stay_with_main_thread_never_get_them():
    """The kernel gives a process's SIGINT to any thread that does not block it; a helper thread
    started inside the block inherits the blocked mask, so only the main thread can be woken."""
    import threading

    from rhocli.core.processes import SignalsStayWithMainThread

    masks = {}

    def record(name):
        masks[name] = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with SignalsStayWithMainThread():
        inside = threading.Thread(target=record, args=("inside",))
        inside.start()
    inside.join()
    outside = threading.Thread(target=record, args=("outside",))
    outside.start()
    outside.join()
    assert {signal.SIGINT, signal.SIGTERM} <= masks["inside"]
    assert signal.SIGINT not in masks["outside"]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the main thread's mask is back


def test_a_signal_inside_a_critical_block_waits_for_its_end():
    from rhocli.core.processes import DeferredSignals

    reached = []
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (not under nohup)
    try:
        _critical_block_run(DeferredSignals, reached)
    finally:
        signal.signal(signal.SIGINT, outer)


def _critical_block_run(DeferredSignals, reached):
    with DeferredSignals() as signals:
        with pytest.raises(KeyboardInterrupt):
            with signals.critical():
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after the signal, inside")  # not cut here
        assert reached == ["after the signal, inside"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # outside a critical block: at once
            reached.append("never")
    assert reached == ["after the signal, inside"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
