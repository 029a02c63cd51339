"""Run untrusted, model-generated Python programs (the ```python blocks of PAL / ToRA answers).

How: ``Sandbox`` starts one or more *zygotes*: ``python -I`` worker processes with a scrubbed
environment that import the heavy modules (``math``, ``sympy``, ``numpy``) once. For every program a
zygote forks ONE NEW PROCESS, so a program starts in milliseconds with sympy already imported and
nothing one program does (globals, monkeypatching, caches, files) is seen by the next. The child:

* becomes a new session (``setsid``), so one ``killpg`` ends it and anything it started;
* where the kernel allows, enters a private user + network namespace: no interface but a downed
  loopback, so not even native code can reach the network (unprivileged user namespaces must be on;
  inside, ``os.getuid()`` reads 65534, and a root caller's program loses root's capabilities);
* runs in a fresh temporary directory, which is also its HOME and TMPDIR and is deleted afterwards;
* has stdin on /dev/null and stdout + stderr in one file inside that directory;
* gets resource limits: RLIMIT_CPU, RLIMIT_AS (the zygote's size plus ``memory_mb``), RLIMIT_FSIZE
  (``output_bytes``, so a 100 MB print is cut by the kernel), RLIMIT_NPROC, RLIMIT_CORE=0;
* sees only a minimal environment (none of the caller's variables: no tokens, no keys);
* gets an audit hook (``sys.addaudithook``, which cannot be removed) that raises PermissionError on
  sockets, on starting processes (when ``Limits.processes == 0``), on ctypes, on signalling
  processes outside its own session, and on writing, deleting, renaming or re-permissioning any
  path outside its working directory (``/dev/null`` excepted).

The zygote enforces the wall-clock limit (SIGKILL to the whole process group), is a child
subreaper so that whatever a program leaves behind (even what escaped the group with setsid) is
re-parented to it and killed, and turns every ending into ``Execution.error``: None, the last line
of the traceback, "Timeout Error", "Memory limit exceeded", "Output limit exceeded", "Killed by
signal N". The caller's side never waits longer than ``wall_s`` plus a few seconds, and replaces a
zygote that died (the program it was running is reported as an error and killed).

What this does NOT protect against -- be honest about the threat model:

* The audit hook is Python-level. It stops generated code that does ordinary things (opens a
  socket, calls subprocess, writes to /tmp or ~, rm -rf's a path) and naive attempts. It does not
  stop code that deliberately attacks the interpreter: patching the standard-library functions the
  hook itself calls, reaching native code through a C extension other than ctypes, abusing
  ``dir_fd`` arguments with symlinks it creates, and so on. ctypes is blocked outright (always, not
  only when ``processes == 0``) because with it a program can call libc directly and every other
  rule is void.
* Reading is not restricted: a program can read any file the zygote's user can read (and print
  it). Run evaluations as an unprivileged user if that matters.
* As root, RLIMIT_NPROC is not enforced by the kernel, so the "no processes" rule rests on the audit
  hook (and on ``_posixsubprocess.fork_exec`` being replaced, since it raises no audit event).
* Disk: every file the program writes is capped at ``output_bytes`` by RLIMIT_FSIZE, but not their
  number; the directory is deleted when the program ends.
* RLIMIT_NPROC counts threads: for a non-root user with ``processes == 0`` a program cannot start
  threads either; with ``processes > 0`` the count is approximate (other processes of the same
  user count too). And exec'd binaries run without the audit hook: only the rlimits, the kill of
  everything left behind and the network namespace, where available, still hold for them.
* Without the network namespace (no user namespaces, not Linux) "no network" rests on the hook.
  Every socket is refused, local ones too, so asyncio (its self-pipe is a socket pair) cannot run.

For adversarial code use OS isolation on top (a container, gVisor, seccomp, a VM).
Needs POSIX ``fork``: elsewhere ``Sandbox`` raises ``NotAvailableError``. No printing from here.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

try:  # prctl and unshare (before 3.12); the child uses it before its audit hook forbids ctypes
    import ctypes
except ImportError:  # pragma: no cover - a Python built without ctypes: no namespace, no death signal
    ctypes = None

TIMEOUT = "Timeout Error"
MEMORY = "Memory limit exceeded"
OUTPUT = "Output limit exceeded"
WORKER_DIED = "Sandbox worker died"

_MAX_ERROR_CHARS = 2000  # an exception message can be huge (str of a 100 MB list): one line, cut
_STARTUP_S = 120.0  # importing sympy + numpy on a cold disk can take long
_SLACK_S = 5.0  # fork + clean-up + reply on top of wall_s before the caller gives up on a zygote
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
#: tasks a worker's pids cgroup allows beyond the worker, the program and Limits.processes
_CGROUP_SLACK = 2


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # wall-clock limit per program
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # extra address space on top of what the preloaded interpreter maps
    output_bytes: int = 1_000_000  # cap on stdout+stderr written by the program
    processes: int = 0  # child processes a program may start (0: none)


@dataclasses.dataclass(frozen=True)
class Execution:
    """``error`` is None when the program ran to the end, else one line: the last line of its
    traceback ("NameError: name 'x' is not defined", "PermissionError: sandbox: ..."), TIMEOUT
    (wall or CPU limit), MEMORY, OUTPUT, "Killed by signal N", "Exited with status N" (an
    ``os._exit(N)``), WORKER_DIED (the zygote died under it; it is replaced) or "Sandbox error: ..."
    (setting up the child failed: a bug or an odd platform, not the program)."""

    stdout: str  # what it printed, stdout and stderr interleaved, utf-8 (errors="replace"), cut at the cap
    error: str | None
    wall_s: float


def minimal_environment(home: str) -> dict[str, str]:
    """The whole environment a zygote and a program get: nothing of the caller's (tokens, keys),
    one BLAS thread (a forked child must not expect the zygote's thread pool), fixed hashing."""
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": home,
        "PYTHONHASHSEED": "0",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


# ---------------------------------------------------------------------------------------------
# Messages: a 4-byte big-endian length, then JSON (used both ways on the zygote's stdin/stdout).


class _WorkerLost(Exception):
    """The zygote did not answer in time, closed its pipe or sent garbage."""

    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


def _send(fd: int, message: dict) -> None:
    data = json.dumps(message).encode("utf-8")
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    """n bytes from fd; _WorkerLost on end of file or when the deadline (monotonic) passes."""
    chunks, left = [], n
    while left:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise _WorkerLost(TIMEOUT)
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise _WorkerLost(WORKER_DIED)
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int, deadline: float | None = None) -> dict:
    (size,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
    try:
        message = json.loads(_read_exact(fd, size, deadline))
    except ValueError:
        raise _WorkerLost(WORKER_DIED) from None
    if not isinstance(message, dict):
        raise _WorkerLost(WORKER_DIED)
    return message


# ---------------------------------------------------------------------------------------------
# The caller's side.


class _Worker:
    """One zygote process and its two pipes. Not thread-safe: the Sandbox lends it to one thread.
    Under OS isolation (``isolation.Isolation``) the zygote runs inside bubblewrap, with a pids
    cgroup of its own when the caller is root."""

    def __init__(self, limits: Limits, preload: tuple[str, ...], home: str, isolation):
        self.limits, self.preload, self.home, self.isolation = limits, preload, home, isolation
        self.proc = None
        self.cgroup = None
        self.preloaded: list[str] = []

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Launch the zygote (not waiting); ``ready`` waits for its preloads."""
        import subprocess

        config = {"limits": dataclasses.asdict(self.limits), "preload": list(self.preload), "home": self.home}
        env = minimal_environment(self.home)
        self.cgroup = self.isolation.new_cgroup()
        argv = self.isolation.wrap([sys.executable, "-I", os.path.abspath(__file__), json.dumps(config)], env, self.cgroup)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, cwd="/" if self.isolation.isolated else self.home, close_fds=True,
            start_new_session=True,  # a Ctrl-C on the caller's terminal is the caller's to handle
        )

    def ready(self) -> None:
        from rhocli.core.errors import NotAvailableError

        try:
            message = _receive(self.proc.stdout.fileno(), time.monotonic() + _STARTUP_S)
        except (_WorkerLost, OSError) as err:
            self.kill()
            raise NotAvailableError(f"the sandbox worker ({sys.executable} -I) did not start: {err}") from None
        self.preloaded = list(message.get("preloaded", []))
        if self.cgroup is not None:  # the worker's tasks now, the program, and the processes it may start
            self.cgroup.limit(self.cgroup.tasks() + 1 + self.limits.processes + _CGROUP_SLACK)

    def run(self, program: str) -> Execution:
        if not self.alive():
            self.restart()
        start = time.monotonic()
        child = None
        try:
            try:
                _send(self.proc.stdin.fileno(), {"program": program})
            except OSError:  # died while idle: the program never reached it, so try a fresh zygote once
                self.restart()
                _send(self.proc.stdin.fileno(), {"program": program})
            out = self.proc.stdout.fileno()
            child = _receive(out, time.monotonic() + _SLACK_S)["pid"]
            reply = _receive(out, start + self.limits.wall_s + _SLACK_S)
            return Execution(stdout=reply["stdout"], error=reply["error"], wall_s=reply["wall_s"])
        except (_WorkerLost, OSError, KeyError, TypeError) as err:
            # The program's fault or not, it ends as an error and the next one gets a fresh zygote.
            self.kill(child)
            error = err.error if isinstance(err, _WorkerLost) else WORKER_DIED
            return Execution(stdout="", error=error, wall_s=time.monotonic() - start)

    def restart(self) -> None:
        self.kill()
        self.start()
        self.ready()

    def kill(self, child: int | None = None) -> None:
        """SIGKILL the zygote and the program it was running (its process group: it called setsid).
        Under isolation ``child`` is a PID of the worker's namespace, meaningless here: killing bubblewrap
        ends its PID namespace, and with it every process inside."""
        if isinstance(child, int) and child > 0 and not self.isolation.isolated:
            _kill_group(child)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
            self.proc = None
        if self.cgroup is not None:
            _wait_empty(self.cgroup)
            self.cgroup.remove()
            self.cgroup = None

    def close(self) -> None:
        """Closing stdin ends the zygote's loop; kill it if it is still busy after a moment."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=2.0)
        except Exception:  # busy, or the pipe is broken: no reason to wait further
            pass
        self.kill()


class Sandbox:
    """Context manager. Starts worker process(es) ("zygotes") once, with a scrubbed environment, that
    pre-import ``preload`` modules (those not installed are skipped), then fork ONE NEW PROCESS PER
    PROGRAM. ``run`` is thread-safe; ``run_many`` spreads programs over the workers, results in order."""

    def __init__(self, limits: Limits = Limits(), preload: tuple[str, ...] = ("math", "sympy", "numpy"),
                 workers: int = 1, isolation=None):
        from rhocli.core.errors import NotAvailableError, UsageError

        if os.name != "posix" or not hasattr(os, "fork") or not hasattr(os, "setsid"):
            raise NotAvailableError("the program sandbox needs a POSIX system (fork, setsid, rlimits)")
        if workers < 1:
            raise UsageError(f"the sandbox needs at least one worker, got {workers}")
        import queue

        from rhocli.eval.isolation import INSIDE_HOME, choose_isolation

        self.limits = limits
        #: the OS isolation of the workers (default: bubblewrap, refused where it is not available)
        self.isolation = isolation if isolation is not None else choose_isolation()
        # isolated, the working directories are in the worker's private tmpfs: nothing on this host
        self._home = INSIDE_HOME if self.isolation.isolated else os.path.realpath(tempfile.mkdtemp(prefix="rho-sandbox-"))
        self._workers = [_Worker(limits, tuple(preload), self._home, self.isolation) for _ in range(workers)]
        self._idle: queue.Queue = queue.Queue()
        self._closed = False
        try:
            for worker in self._workers:  # all start at once: the preloads overlap
                worker.start()
            for worker in self._workers:
                worker.ready()
                self._idle.put(worker)
        except BaseException:
            self.close()
            raise

    def run(self, program: str) -> Execution:
        if self._closed:
            raise RuntimeError("the sandbox is closed")
        worker = self._idle.get()
        try:
            return worker.run(program)
        finally:
            self._idle.put(worker)

    def run_many(self, programs: list[str]) -> list[Execution]:
        if len(self._workers) == 1 or len(programs) <= 1:
            return [self.run(p) for p in programs]
        from concurrent.futures import ThreadPoolExecutor

        # Threads only wait on pipes; each borrows an idle zygote, so at most `workers` run at once.
        with ThreadPoolExecutor(max_workers=len(self._workers)) as pool:
            return list(pool.map(self.run, programs))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.close()
        if not self.isolation.isolated:
            shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The zygote: started as ``python -I sandbox.py CONFIG``; loops over requests, one fork each.


def _zygote_main(config: dict) -> None:
    limits = Limits(**config["limits"])
    home = config["home"]
    # Our stdin/stdout are the protocol; move them away so nothing (a chatty import, a forked child
    # before its redirect) can write into the reply stream or read a request.
    inbox, outbox = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    _become_subreaper()
    preloaded = _preload(config["preload"])
    _send(outbox, {"preloaded": preloaded})
    while True:
        try:
            request = _receive(inbox)
        except _WorkerLost:  # the caller closed our stdin (closing, or died): clean up, done
            shutil.rmtree(home, ignore_errors=True)
            return
        try:
            reply = _run_one(request["program"], limits, home, outbox)
            _send(outbox, reply)
        except BrokenPipeError:
            return


def _preload(names: list[str]) -> list[str]:
    """Import what the programs will use, so every forked child starts with it; skip what is missing."""
    import importlib

    loaded = []
    for name in names:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception:  # not installed, or broken: the program will see the same ImportError
            pass
    try:  # imported here so that replacing its fork_exec in the child covers every later user
        import _posixsubprocess  # noqa: F401
    except ImportError:
        pass
    return loaded


def _run_one(program: str, limits: Limits, home: str, outbox: int) -> dict:
    """Fork a child for the program, wait with a deadline, classify how it ended, clean up."""
    workdir = tempfile.mkdtemp(prefix="run-", dir=home)
    # The zygote keeps its own descriptor to the output file and to the error pipe: whatever the
    # program does to its directory, we can still read what it printed and why it failed.
    output = os.open(os.path.join(workdir, ".output"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    error_r, error_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns, whatever happens
        try:
            _child_main(program, workdir, limits, output, error_w, os.getppid())
        finally:
            os._exit(70)
    os.close(error_w)
    try:
        _send(outbox, {"pid": pid})  # lets the caller kill the program's group if we die
        exited = _wait_exit(pid, start + limits.wall_s)
        _kill_group(pid)  # the exited child is a zombie still: its group id cannot be reused yet
        _, status, usage = os.wait4(pid, 0)
        _kill_orphans()  # what left the group (setsid, setpgid) and was re-parented to us
        wall = time.monotonic() - start
        error = _classify(status, exited, usage, _read_error(error_r), limits)
        size = os.fstat(output).st_size
        if size >= limits.output_bytes:  # cut at the cap: whatever else went wrong, this did
            error = OUTPUT
        stdout = os.pread(output, min(size, limits.output_bytes), 0).decode("utf-8", errors="replace")
        return {"stdout": stdout, "error": error, "wall_s": round(wall, 6)}
    finally:
        os.close(output)
        os.close(error_r)
        _remove_tree(workdir)


def _wait_exit(pid: int, deadline: float) -> bool:
    """True once the child has exited (left unreaped, see _run_one), False at the deadline.
    A pidfd wakes us the moment it ends; without one, poll with short, growing sleeps."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    delay = 0.0005
    try:
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], remaining)
            else:
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.01)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _wait_empty(cgroup, timeout: float = 5.0) -> None:
    """Until every task of a killed worker's cgroup has exited (the kernel reaps a PID namespace's
    processes once its init is gone)."""
    deadline = time.monotonic() + timeout
    while cgroup.tasks() and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:  # nothing left in it, or not ours
        pass


def _become_subreaper() -> None:
    """Linux: processes a program leaves behind are re-parented to the zygote (not to init) when
    their parent dies, even those that escaped the process group, so _kill_orphans finds them."""
    if ctypes is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _kill_orphans() -> None:
    """SIGKILL and reap every remaining child of the zygote, round after round: killing one
    re-parents its own children to us."""
    for _ in range(1000):
        orphans = _children()
        if not orphans:
            return
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in orphans:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _children() -> list[int]:
    """The zygote's child processes: from /proc/self/task/*/children where the kernel has it
    (cheap), else from every process's parent id."""
    me = os.getpid()
    try:
        with open(f"/proc/self/task/{me}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        pass
    found = []
    for name in filter(str.isdigit, _listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if int(f.read().rsplit(b")", 1)[1].split()[1]) == me:  # state ppid ...
                    found.append(int(name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def _read_error(fd: int) -> str | None:
    """The child's one-line error, if it wrote one (it writes at most _MAX_ERROR_CHARS, well below a
    pipe's buffer, so it is all there once the child has exited)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:  # a grandchild still holds the pipe open; what is there is all
            break
        if not chunk:
            break
        chunks.append(chunk)
    text = b"".join(chunks).decode("utf-8", errors="replace")[:_MAX_ERROR_CHARS]
    return text or None


def _classify(status: int, exited: bool, usage, error: str | None, limits: Limits) -> str | None:
    """How the program ended, as Execution.error."""
    if not exited:
        return TIMEOUT
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        cpu = usage.ru_utime + usage.ru_stime
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_s):  # soft / hard CPU limit
            return TIMEOUT
        if sig == signal.SIGXFSZ:
            return OUTPUT
        return f"Killed by signal {sig}"
    if error is not None:
        return error
    code = os.WEXITSTATUS(status)
    return None if code == 0 else f"Exited with status {code}"  # os._exit(n) skips our reporting


def _remove_tree(path: str) -> None:
    """Delete the working directory, even where the program took the permissions off a folder."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        for folder, _, _ in os.walk(path):
            try:
                os.chmod(folder, 0o700)
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The forked child. Order matters: everything that the audit hook or the limits would forbid
# (ctypes, opening files, putenv) happens before they are installed.


def _child_main(program: str, workdir: str, limits: Limits, output: int, error_w: int, zygote: int) -> None:
    """Never returns. The error pipe goes to fd 3 first, so even a failing set-up is reported."""
    if output == 3:
        output = os.dup(output)
    os.dup2(error_w, 3)
    try:
        os.setsid()  # own session and process group: one killpg reaches everything it starts
        _isolate_network()
        _die_with(zygote)  # after unshare: a change of credentials clears the parent-death signal
        os.chdir(workdir)
        _redirect(output)
        _scrub_environment(workdir)
        if limits.processes == 0:
            _disable_posixsubprocess()
        _set_limits(limits)
        sys.addaudithook(_audit_hook(workdir, limits.processes))
    except BaseException as exc:  # a bug of ours or an odd platform: not the program's fault
        _report(f"Sandbox error: {_error_line(exc)}")
        os._exit(70)
    _report(_execute(program))
    os._exit(0)  # no atexit handlers, no finalizers: the directory is deleted anyway


def _report(error: str | None) -> None:
    if error is not None:
        try:
            os.write(3, error[:_MAX_ERROR_CHARS].encode("utf-8", errors="replace"))
        except OSError:
            pass


def _isolate_network() -> bool:
    """Best effort: a new user + network namespace has no usable interface, so even native code or
    an exec'd binary cannot reach the network. Fails where user namespaces are off: then the audit
    hook is the only guard."""
    flags = _CLONE_NEWUSER | _CLONE_NEWNET
    try:
        if hasattr(os, "unshare"):  # Python 3.12+
            os.unshare(flags)
            return True
        if ctypes is None or not sys.platform.startswith("linux"):
            return False
        return ctypes.CDLL(None, use_errno=True).unshare(flags) == 0
    except (OSError, AttributeError):
        return False


def _die_with(zygote: int) -> None:
    """SIGKILL this process when the zygote dies (it will not be there to enforce the deadline)."""
    if ctypes is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != zygote:  # it died before we asked
        os._exit(1)


def _redirect(output: int) -> None:
    """stdin from /dev/null, stdout and stderr to the output file (one shared offset, so their
    lines interleave as on a terminal), every descriptor above the error pipe (fd 3) closed: the
    zygote's protocol pipes above all."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    # Fresh text streams, line-buffered (buffering=1), so what was printed before a kill is kept.
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                                       closefd=False)
    sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", closefd=False)


def _scrub_environment(workdir: str) -> None:
    os.environ.clear()
    os.environ.update(minimal_environment(workdir))
    os.environ["TMPDIR"] = workdir  # tempfile's files land where writing is allowed
    tempfile.tempdir = workdir
    sys.argv = [""]
    sys.dont_write_bytecode = True  # a .pyc next to a library would be a write outside workdir


def _disable_posixsubprocess() -> None:
    """``_posixsubprocess.fork_exec`` (multiprocessing's spawn, subprocess' internals) raises no
    audit event; as root RLIMIT_NPROC does not stop it either. Replace it for this child."""
    module = sys.modules.get("_posixsubprocess")
    if module is None:
        return

    def fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: starting processes is not allowed")

    module.fork_exec = fork_exec


def _set_limits(limits: Limits) -> None:
    _limit(resource.RLIMIT_CORE, 0, 0)
    # The soft CPU limit sends SIGXCPU (a timeout we can name); the hard one, a second later, SIGKILL.
    _limit(resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 1)
    _limit(resource.RLIMIT_FSIZE, limits.output_bytes, limits.output_bytes)
    if os.geteuid() != 0:  # the kernel ignores it for root; for others it counts threads of the user
        allowed = 0 if limits.processes == 0 else _tasks_of_user(os.getuid()) + limits.processes
        _limit(resource.RLIMIT_NPROC, allowed, allowed)
    # Last, as it counts every mapping: the forked interpreter (with sympy, numpy) plus memory_mb.
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc: no address-space limit (macOS does not enforce one anyway)
        return
    extra = limits.memory_mb * 1024 * 1024
    _limit(resource.RLIMIT_AS, mapped + extra, mapped + extra)


def _limit(which: int, soft: int, hard: int) -> None:
    """setrlimit, never above the hard limit we inherited (only root could raise it)."""
    _, current = resource.getrlimit(which)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass


def _tasks_of_user(uid: int) -> int:
    """Threads of processes owned by uid: what RLIMIT_NPROC counts."""
    count = 0
    for name in filter(str.isdigit, _listdir("/proc")):
        try:
            if os.stat(f"/proc/{name}").st_uid == uid:
                count += len(os.listdir(f"/proc/{name}/task"))
        except OSError:
            pass
    return count


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:  # no /proc (not Linux)
        return []


def _execute(program: str) -> str | None:
    """Run the program as __main__; None when it ran to the end, else its one-line error."""
    error = None
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__main__"})
    except SystemExit as exc:
        if exc.code not in (None, 0):
            error = _error_line(exc)
    except BaseException as exc:
        error = _error_line(exc)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException as exc:  # the output cap (EFBIG) can first show here
            error = error or _error_line(exc)
    return error


def _error_line(exc: BaseException) -> str:
    """The traceback's last line ("NameError: name 'x' is not defined") as one line, or the limit
    that the exception stands for."""
    if isinstance(exc, MemoryError):
        return MEMORY
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return OUTPUT
    try:
        lines = traceback.format_exception_only(type(exc), exc)
        # A SyntaxError's lines show the source first; otherwise any notes follow the message.
        line = lines[-1] if isinstance(exc, SyntaxError) else lines[0]
        return " ".join(line.strip().splitlines())[:_MAX_ERROR_CHARS]
    except BaseException:  # no memory left to format, a __str__ that raises...
        return type(exc).__name__


# The audit hook. Events and their arguments: https://docs.python.org/3/library/audit_events.html

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PROCESS_EVENTS = frozenset({"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system", "os.spawn",
                             "subprocess.Popen", "pty.spawn"})
# Events that change the file system: (index of a path argument, index of its dir_fd or None), ...
_PATH_EVENTS = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),  # the source too: a hard link would make an outside file writable
    "os.symlink": ((1, 2),),  # where it goes; following it later is checked at the open
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.truncate": ((0, None),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "shutil.rmtree": ((0, 1),),
    "shutil.copyfile": ((1, None),),
    "shutil.copytree": ((1, None),),
    "shutil.move": ((0, None), (1, None)),
    "shutil.chown": ((0, None),),
    "shutil.unpack_archive": ((1, None),),
}


def _audit_hook(workdir: str, processes: int):
    """The hook for one child: raises PermissionError for what the module docstring lists."""
    allowed_files = frozenset({os.devnull})
    own_session = os.getsid(0)

    def resolve(path, dir_fd=None) -> str | None:
        """Absolute, symlink-free path; None for a descriptor (already opened, so already checked)."""
        if path is None or isinstance(path, int):
            return None
        path = os.fsdecode(os.fspath(path))
        if not os.path.isabs(path):
            # dir_fd is None, or -1 where the call had none
            base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
            path = os.path.join(base, path)
        return os.path.realpath(path)

    def inside(resolved: str) -> bool:
        return resolved == workdir or resolved.startswith(workdir + os.sep) or resolved in allowed_files

    def check_write(event: str, path, dir_fd=None) -> None:
        resolved = resolve(path, dir_fd)
        if resolved is not None and not inside(resolved):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed: {resolved}")

    def same_session(pid: int) -> bool:
        if pid in (0, os.getpid()):
            return True
        try:
            return pid != -1 and os.getsid(abs(pid)) == own_session
        except OSError:
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(flags, int) and flags & _WRITE_FLAGS:
                check_write("writing", path)
            elif mode is None and path is not None and not isinstance(path, int):
                # os.open of a directory would give a dir_fd, and "open" events do not show the
                # dir_fd later relative opens use: allow directory descriptors inside only.
                resolved = resolve(path)
                if not inside(resolved) and os.path.isdir(resolved):
                    raise PermissionError(f"sandbox: opening a directory outside the working directory: {resolved}")
        elif event in _PATH_EVENTS:
            for path_index, fd_index in _PATH_EVENTS[event]:
                dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
                if path_index < len(args):
                    check_write(event, args[path_index], dir_fd)
        elif event.startswith("socket."):
            raise PermissionError(f"sandbox: network access is not allowed ({event})")
        elif event.startswith("ctypes."):
            raise PermissionError(f"sandbox: ctypes is not allowed ({event})")
        elif event in _PROCESS_EVENTS:
            if processes == 0:
                raise PermissionError(f"sandbox: starting processes is not allowed ({event})")
        elif event in ("os.kill", "os.killpg"):
            target = args[0] if event == "os.kill" else -args[0]
            if not same_session(target):
                raise PermissionError(f"sandbox: signalling processes outside the program is not allowed ({event})")
        elif event == "resource.prlimit":
            if args[0] not in (0, os.getpid()):
                raise PermissionError("sandbox: changing another process's limits is not allowed")
        elif event == "import" and processes == 0 and args[0] == "_posixsubprocess":
            raise PermissionError("sandbox: starting processes is not allowed (_posixsubprocess)")
        elif event == "sqlite3.connect":
            database = args[0]
            if isinstance(database, str) and database.startswith("file:"):  # a URI names any path
                raise PermissionError("sandbox: sqlite3 URIs are not allowed")
            if database not in (":memory:", ""):
                check_write("sqlite3.connect", database)
        elif event in ("sqlite3.enable_load_extension", "sqlite3.load_extension"):
            raise PermissionError(f"sandbox: {event} is not allowed")

    return hook


if __name__ == "__main__":
    _zygote_main(json.loads(sys.argv[1]))
