"""Reliability mechanisms on their own (fast, no training): the output lock."""

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
