"""The program sandbox of ``rho eval``: every hostile program ends as a recorded error within the
limits, leaves nothing running or written outside its directory, and the next program in the same
sandbox still runs correctly."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from rhocli.core.errors import NotAvailableError
from rhocli.eval import sandbox as sandbox_module
from rhocli.eval.sandbox import MEMORY, OUTPUT, TIMEOUT, WORKER_DIED, Limits, Sandbox

# every test here runs generated programs: under bubblewrap, as rho eval does
pytestmark = pytest.mark.usefixtures("program_isolation")

LIMITS = Limits(wall_s=3, memory_mb=256, output_bytes=1_000_000)
SECRET = "RHO_SANDBOX_TEST_SECRET"
PRINT_SESSION = "import os\nprint(os.getsid(0), flush=True)\n"


@pytest.fixture(scope="module")
def sandbox():
    """One sandbox for the module, started while the caller's environment holds a secret."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SECRET, "hunter2")
        box = Sandbox(LIMITS, preload=("math",))
    with box:
        yield box


def assert_still_works(box: Sandbox) -> None:
    """The program after a hostile one runs normally in the same sandbox."""
    result = box.run("print(sum(range(10)))")
    assert (result.stdout, result.error) == ("45\n", None)


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # an unreaped orphan is dead
    except psutil.NoSuchProcess:
        return False


def zygote_of(worker) -> psutil.Process:
    """The worker's zygote: the process itself, or under bubblewrap the Python process inside it."""
    top = psutil.Process(worker.pid)
    if not worker.isolation.isolated:
        return top
    for proc in top.children(recursive=True):
        try:
            if proc.name() != "bwrap" and "sandbox.py" in " ".join(proc.cmdline()):
                return proc
        except psutil.Error:
            pass
    raise AssertionError("no zygote inside the worker")


def zygote_children(box: Sandbox) -> list[psutil.Process]:
    """Every live process a program left behind (under the zygote: a subreaper; under bubblewrap,
    also whatever the PID namespace's init holds beside the zygote)."""
    left = []
    for w in box._workers:
        zygote = zygote_of(w)
        left += [c for c in zygote.children(recursive=True) if alive(c)]
        if w.isolation.isolated:
            init = zygote.parent()
            left += [c for c in init.children() if c.pid != zygote.pid and alive(c)]
    return left


def test_a_normal_program_and_an_exception(sandbox):
    result = sandbox.run("print(sum(range(10)))")
    assert (result.stdout, result.error) == ("45\n", None)
    assert 0 < result.wall_s < 1
    assert sandbox.run("x = 1\nprint(x / 0)").error == "ZeroDivisionError: division by zero"
    assert sandbox.run("print(y)").error == "NameError: name 'y' is not defined"
    assert sandbox.run("x = ").error.startswith("SyntaxError")
    assert sandbox.run("import sys; sys.exit(0)").error is None
    assert sandbox.run("import sys; sys.exit(3)").error == "SystemExit: 3"
    # stdout and stderr share one stream, as on a terminal; printed text survives an error
    mixed = sandbox.run("import sys\nprint('a')\nprint('b', file=sys.stderr)\nraise ValueError('bad\\nvalue')")
    assert (mixed.stdout, mixed.error) == ("a\nb\n", "ValueError: bad value")
    # each program is a fresh process: nothing leaks from one program to the next
    sandbox.run("import math\nmath.pi = 3\nleaked = 1")
    assert sandbox.run("import math\nprint(math.pi > 3, 'leaked' in globals())").stdout == "True False\n"


def test_an_infinite_loop_is_a_timeout(sandbox):
    start = time.monotonic()
    result = sandbox.run(PRINT_SESSION + "while True: pass")
    assert result.error == TIMEOUT
    assert time.monotonic() - start < LIMITS.wall_s + 2
    assert LIMITS.wall_s <= result.wall_s < LIMITS.wall_s + 2
    assert zygote_children(sandbox) == []
    assert_still_works(sandbox)


def test_the_cpu_limit_is_a_timeout_too():
    with Sandbox(Limits(wall_s=10, cpu_s=1), preload=("math",)) as box:
        result = box.run("while True: pass")
        assert result.error == TIMEOUT  # SIGXCPU after one CPU second, long before the wall clock
        assert result.wall_s < 4
        assert_still_works(box)


@pytest.mark.parametrize("program", ["x = bytearray(10**10)", "l = []\nwhile True: l.append(' ' * 10**6)"])
def test_memory_bombs_hit_the_memory_limit(sandbox, program):
    result = sandbox.run(program)
    assert result.error == MEMORY
    assert result.wall_s < LIMITS.wall_s
    assert_still_works(sandbox)


def test_memory_below_the_limit_is_usable(sandbox):
    # memory_mb is on top of what the forked interpreter already maps
    result = sandbox.run("x = bytearray(150 * 2**20)\nprint(len(x) // 2**20)")
    assert (result.stdout, result.error) == ("150\n", None)


@pytest.mark.parametrize("program", [
    "while True: os.fork()",
    "import subprocess\nsubprocess.run(['sleep', '100'])",
    "os.system('sleep 100')",
    # multiprocessing's spawn goes through _posixsubprocess.fork_exec, which raises no audit event
    "import multiprocessing as mp\nmp.get_context('spawn').Process(target=print).start()",
])
def test_starting_processes_is_refused_and_nothing_survives(sandbox, program):
    result = sandbox.run(PRINT_SESSION + program)
    assert result.error.startswith("PermissionError"), result.error
    assert zygote_children(sandbox) == []
    assert_still_works(sandbox)


@pytest.mark.parametrize("program", [
    "print('x' * 100_000_000)",
    "while True:\n    print('a line of output', 12345)",
    "import sys\nwhile True:\n    sys.stderr.write('e' * 4096)",
])
def test_printing_too_much_hits_the_output_limit(sandbox, program):
    result = sandbox.run(program)
    assert result.error == OUTPUT
    assert 0 < len(result.stdout.encode("utf-8")) <= LIMITS.output_bytes
    assert result.wall_s < LIMITS.wall_s
    assert_still_works(sandbox)


@pytest.mark.parametrize("program", [
    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "import socket\nsocket.socket()",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9/')",
])
def test_the_network_is_refused(sandbox, program):
    error = sandbox.run(program).error
    assert error.startswith("PermissionError") or error.startswith("urllib.error.URLError"), error
    assert "sandbox" in error
    assert_still_works(sandbox)


def interfaces(net_dev: str) -> list[str]:
    return sorted(line.split(":")[0].strip() for line in net_dev.splitlines()[2:])


def test_a_private_network_namespace_where_the_kernel_allows_it(sandbox):
    """Beyond the audit hook: even native code sees no network interface but loopback."""
    with open("/proc/self/net/dev") as f:
        host = interfaces(f.read())
    inside = interfaces(sandbox.run("print(open('/proc/self/net/dev').read(), end='')").stdout)
    if inside == host and host != ["lo"]:
        pytest.skip("no user namespaces here: the audit hook alone refuses the network")
    assert inside == ["lo"]


@pytest.fixture
def outside_tmp():
    """A directory outside /tmp (which a worker under bubblewrap has a private tmpfs for): visible to
    the programs, read-only for them."""
    import shutil

    path = Path("/var/tmp") / f"rho-sandbox-test-{uuid.uuid4().hex}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_writing_outside_the_working_directory_is_refused(sandbox, outside_tmp):
    tmp_path = outside_tmp
    escape = f"/tmp/rho-sandbox-escape-{uuid.uuid4().hex}"
    result = sandbox.run(f"open({escape!r}, 'w').write('escaped')")
    assert result.error.startswith("PermissionError"), result.error
    assert not os.path.exists(escape)

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for program in (f"import os\nos.remove({str(victim)!r})",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                    f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
                    f"import os\nos.chmod({str(victim)!r}, 0o777)",
                    f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'a').write('x')",
                    f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)"):  # a dir_fd to write through
        assert sandbox.run(program).error.startswith("PermissionError"), program
    assert victim.read_text() == "keep me"
    assert sandbox.run(f"print(open({str(victim)!r}).read())").stdout == "keep me\n"  # reading is allowed
    assert_still_works(sandbox)


def test_writing_inside_the_working_directory_works(sandbox):
    result = sandbox.run("open('a.txt', 'w').write('hi')\nprint(open('a.txt').read())")
    assert (result.stdout, result.error) == ("hi\n", None)
    program = ("import os, shutil, tempfile\n"
               "os.makedirs('d/e')\nopen('d/e/f', 'w').close()\nshutil.rmtree('d')\n"
               "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n"
               "print(os.path.exists('a.txt'), os.path.exists('d'))")
    result = sandbox.run(program)
    # a fresh directory per program: the previous program's a.txt is gone
    assert (result.stdout, result.error) == ("False False\n", None)


def test_the_environment_is_scrubbed(sandbox):
    result = sandbox.run("import os\nprint(sorted(os.environ))\nprint(os.environ.get('RHO_SANDBOX_TEST_SECRET'))")
    keys, secret = result.stdout.splitlines()
    assert secret == "None"
    assert set(eval(keys)) <= set(sandbox_module.minimal_environment("/")) | {"TMPDIR"}


def test_other_processes_and_ctypes_are_out_of_reach(sandbox):
    zygote = sandbox._workers[0].pid
    for program in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                    "import os, signal\nos.kill(-1, signal.SIGKILL)",
                    "import ctypes\nctypes.CDLL(None).getpid()"):
        assert sandbox.run(program).error.startswith("PermissionError"), program
    assert sandbox._workers[0].pid == zygote  # not restarted: it was never hit
    assert_still_works(sandbox)


def test_a_dead_zygote_is_replaced_and_the_program_reported():
    with Sandbox(LIMITS, preload=("math",)) as box:
        worker = box._workers[0].pid
        zygote = zygote_of(box._workers[0]).pid
        programs = []

        def kill_the_zygote():
            time.sleep(0.5)
            programs.extend(psutil.Process(zygote).children())
            os.kill(zygote, 9)

        killer = threading.Thread(target=kill_the_zygote)
        killer.start()
        start = time.monotonic()
        result = box.run("import time\ntime.sleep(60)")
        killer.join()
        assert result.error == WORKER_DIED
        assert time.monotonic() - start < LIMITS.wall_s
        assert len(programs) == 1
        deadline = time.monotonic() + 2  # SIGKILL is sent at once, the exit takes a moment
        while alive(programs[0]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(programs[0])
        assert_still_works(box)
        assert box._workers[0].pid != worker


def test_sympy_and_numpy_are_usable_when_preloaded():
    with Sandbox(LIMITS) as box:  # the default preload: math, sympy, numpy
        result = box.run("import sympy as sp\nimport numpy as np\nx = sp.symbols('x')\n"
                         "print(sp.solve(x**2 - 4, x), int(np.arange(5).sum()))")
        assert (result.stdout, result.error) == ("[-2, 2] 10\n", None)
        assert result.wall_s < 2  # preloaded: no import of sympy per program


def test_run_many_keeps_the_order_over_two_workers():
    programs = [f"import time\ntime.sleep({0.3 if i % 2 else 0.05})\nprint({i})" for i in range(8)]
    programs[3] = "print(1 / 0)"
    with Sandbox(LIMITS, preload=("math",), workers=2) as box:
        start = time.monotonic()
        results = box.run_many(programs)
        elapsed = time.monotonic() - start
        assert [r.stdout for r in results] == [f"{i}\n" if i != 3 else "" for i in range(8)]
        assert [r.error for r in results] == [None] * 3 + ["ZeroDivisionError: division by zero"] + [None] * 4
        assert elapsed < 0.95  # one after the other: 1.1 s of sleeping alone
        assert len({w.pid for w in box._workers}) == 2


def test_without_fork_the_sandbox_is_not_available(monkeypatch):
    monkeypatch.delattr(sandbox_module.os, "fork")
    with pytest.raises(NotAvailableError):
        Sandbox(LIMITS)
