"""Hostile programs against the operating-system isolation of ``rho eval``'s sandbox (bubblewrap).

Every escape found against the Python-level sandbox, and the usual others, run through exactly the
path ``rho eval`` uses (``Sandbox`` with its default isolation, two workers): each is contained:
nothing written outside, the evaluator (this test process) alive, no process left, the next program
fine. A second set runs a shell inside the isolation itself, with no Python hook in the way, to show
the kernel is what holds: a read-only filesystem, no network device, no other process visible or
signalled, a bounded number of tasks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from rhocli.eval import isolation as isolation_module
from rhocli.eval.sandbox import Limits, Sandbox

SECRET = "RHO_ISOLATION_TEST_SECRET"
LIMITS = Limits(wall_s=4, cpu_s=5, memory_mb=256)


def _isolation():
    isolation, why = isolation_module._probe()
    if isolation is None:
        pytest.skip(f"no OS isolation on this machine ({why}); .ci/run installs bubblewrap")
    return isolation


@pytest.fixture(scope="module")
def box():
    _isolation()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SECRET, "hunter2")
        sandbox = Sandbox(LIMITS, workers=2)  # as rho eval builds it
    with sandbox:
        yield sandbox


@pytest.fixture
def outside():
    """A directory outside /tmp (the workers' /tmp is a private tmpfs): visible to programs, read-only."""
    import shutil

    path = Path("/var/tmp") / f"rho-isolation-{uuid.uuid4().hex}"
    path.mkdir()
    (path / "victim.txt").write_text("keep me")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RESTORE_FORK_EXEC = "import subprocess, _posixsubprocess\n_posixsubprocess.fork_exec = subprocess._fork_exec\n"

HOSTILE = {
    # subprocess keeps its own reference to the original fork_exec: a shell, writing outside
    "fork_exec shell": RESTORE_FORK_EXEC + "subprocess.run(['/bin/sh', '-c', 'echo escaped >> {victim}; touch {outside}/new'])",
    "mkfifo / mknod": "import os\nos.mkfifo('{outside}/fifo')\n",
    "mknod": "import os, stat\nos.mknod('{outside}/node', 0o600 | stat.S_IFREG)\n",
    # a directory swapped for a symlink between a check and an open
    "symlink swap": ("import os, threading\nos.mkdir('d')\nstop = False\n"
                     "def swap():\n    while not stop:\n        try:\n            os.rmdir('d'); os.symlink('{outside}', 'd')\n"
                     "            os.unlink('d'); os.mkdir('d')\n        except OSError:\n            pass\n"
                     "t = threading.Thread(target=swap); t.start()\n"
                     "for _ in range(2000):\n    try:\n        open('d/victim.txt', 'a').write('escaped\\n')\n"
                     "    except OSError:\n        pass\nstop = True; t.join()\n"),
    "pidfd signal": ("import os, signal\nprint(open('/proc/{evaluator}/stat').read())\n"
                     "fd = os.pidfd_open({evaluator})\nsignal.pidfd_send_signal(fd, signal.SIGTERM)\n"),
    "kill": "import os, signal\nos.kill({evaluator}, signal.SIGTERM)\n",
    "ctypes kill": "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.kill({evaluator}, 15)\nlibc.kill(-1, 9)\n",
    "execv": "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo escaped >> {victim}'])\n",
    "proc self fd": ("import os\nfor n in os.listdir('/proc/self/fd'):\n    try:\n"
                     "        open('/proc/self/fd/' + n, 'a').write('escaped')\n    except Exception:\n        pass\n"
                     "open('/proc/{evaluator}/fd/1', 'a').write('escaped')\n"),
    "bind a socket": "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', {port}))\ns.listen()\nimport time; time.sleep(3)\n",
    "evaluator environment": ("import os\nprint(os.environ)\nfor pid in ('1', 'self', '{evaluator}'):\n    try:\n"
                              "        print(open('/proc/' + pid + '/environ').read())\n    except OSError:\n        pass\n"),
    "fork bomb": RESTORE_FORK_EXEC + "subprocess.run(['/bin/sh', '-c', 'b() {{ b | b & }}; b; sleep 10'])",
}


def _processes_left(sandbox: Sandbox) -> list[psutil.Process]:
    """Live processes under each worker beyond its bubblewrap pair and its zygote."""
    left = []
    for worker in sandbox._workers:
        for proc in psutil.Process(worker.pid).children(recursive=True):
            try:  # bwrap's own init, and the zygote (bwrap's child); anything else is a program's
                if proc.status() != psutil.STATUS_ZOMBIE and "bwrap" not in (proc.name(), psutil.Process(proc.ppid()).name()):
                    left.append(proc)
            except psutil.Error:
                pass
    return left


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_are_contained(box, outside, name):
    port = _free_port()
    program = HOSTILE[name].format(victim=outside / "victim.txt", outside=outside, evaluator=os.getpid(), port=port)
    start = time.monotonic()
    result = box.run(program)
    assert time.monotonic() - start < LIMITS.wall_s + 5
    # nothing written outside; the evaluator (this process) is alive to check it
    assert (outside / "victim.txt").read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert SECRET not in result.stdout and "hunter2" not in result.stdout
    with socket.socket() as s:  # nothing listens on this machine
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", port)) != 0
    deadline = time.monotonic() + 3
    while _processes_left(box) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_left(box) == []
    for _ in range(2):  # both workers still run programs
        assert box.run("print(sum(range(10)))").stdout == "45\n"


def _inside(script: str, tasks: int | None = None) -> subprocess.CompletedProcess:
    """``sh -c script`` inside the isolation exactly as a worker is started (no Python hook at all)."""
    isolation = _isolation()
    cgroup = isolation.new_cgroup()
    try:
        if cgroup is not None and tasks is not None:
            cgroup.limit(tasks)
        argv = isolation.wrap(["/bin/sh", "-c", script], {"PATH": "/usr/bin:/bin"}, cgroup)
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        if cgroup is not None:
            cgroup.remove()


def test_the_kernel_holds_without_any_python_hook(outside):
    victim = outside / "victim.txt"
    me = os.getpid()
    proc = _inside(f"echo escaped >> {victim}; echo rc=$?; touch {outside}/new; "
                   f"kill -TERM {me}; echo kill=$?; ls /proc | grep -c '^[0-9]'; "
                   f"cat /proc/{me}/environ; tail -n +3 /proc/net/dev | cut -d: -f1; id -u; "
                   "echo tmp > /tmp/ok && cat /tmp/ok")
    assert victim.read_text() == "keep me" and not (outside / "new").exists()
    lines = proc.stdout.split()
    assert "rc=0" not in lines and "kill=1" in lines  # a read-only filesystem; no such process
    assert int(lines[lines.index("kill=1") + 1]) <= 4  # bwrap's init, the shell and its children
    assert "hunter2" not in proc.stdout
    assert lines[lines.index("kill=1") + 2:-2] == ["lo"]  # the network namespace's only device
    assert lines[-2:] == ["65534", "tmp"]  # nobody; its private /tmp is writable


def test_a_fork_bomb_is_bounded_by_the_process_limit():
    isolation = _isolation()
    if isolation.process_limit != "cgroup":
        pytest.skip("the cgroup limit is root's; an unprivileged caller's programs get RLIMIT_NPROC")
    cgroup = isolation.new_cgroup()
    try:
        cgroup.limit(20)
        # the shell tries to start 60 sleepers: the cgroup allows 20 tasks in all (bwrap included), and
        # the kernel counts every fork it refused at that limit (pids.events)
        argv = isolation.wrap(["/bin/sh", "-c", "for i in $(seq 60); do sleep 2 & done; wait"],
                              {"PATH": "/usr/bin:/bin"}, cgroup)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        refused = int((cgroup.path / "pids.events").read_text().split()[-1])
        assert refused > 0, (proc.returncode, proc.stderr[-500:])
        assert "fork" in proc.stderr.lower() or "resource temporarily unavailable" in proc.stderr.lower()
    finally:
        cgroup.remove()


def test_without_isolation_rho_eval_refuses_unless_told_it_is_unsafe(monkeypatch):
    from rhocli.core.errors import NotAvailableError

    isolation_module._probe.cache_clear()
    monkeypatch.setattr(isolation_module.shutil, "which", lambda name: None)
    try:
        with pytest.raises(NotAvailableError, match="bubblewrap .* is not installed.*--unsafe-no-isolation"):
            isolation_module.choose_isolation()
        unsafe = isolation_module.choose_isolation(allow_unsafe=True)
        assert unsafe.kind == "none" and "without operating-system isolation" in unsafe.describe()["note"]
    finally:
        isolation_module._probe.cache_clear()
