"""Operating-system isolation for the sandbox's worker processes (``rhocli.eval.sandbox``).

Generated programs are hostile input. A sandbox worker (the zygote that forks one process per
program) is started inside **bubblewrap** (``bwrap``, Debian's ``bubblewrap``; the tool Flatpak
uses), with:

* new user, mount, PID, network, IPC, UTS and cgroup namespaces (``--unshare-all``): no network
  device but a downed loopback; no process outside the worker is visible (``/proc`` is the
  namespace's own) or can be signalled; the caller's environment is not passed (``--clearenv``);
* every capability dropped, the uid inside 65534 (nobody);
* the whole filesystem read-only (``--ro-bind / /``), a private ``/dev``, and a private, size-capped
  tmpfs at ``/tmp``: the only writable place, thrown away with the worker;
* ``--die-with-parent`` and ``--new-session`` (no terminal injection);
* a process limit the kernel enforces: RLIMIT_NPROC (set per program) for an unprivileged caller;
  for root, whose kernel uid RLIMIT_NPROC ignores, a ``pids`` cgroup per worker (``pids.max``).

``choose_isolation`` probes all of that once (a ``bwrap`` run of ``/bin/true``). Where it is not
available, ``rho eval`` refuses to run programs, unless the user passes the explicit opt-in flag
(``--unsafe-no-isolation``), and the run's settings record which isolation was used.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from rhocli.core.errors import NotAvailableError

#: the private tmpfs's size cap (the programs' files, and the zygote's working directories)
TMPFS_BYTES = 256 * 2**20
#: where the zygote's working directory is, inside the namespace
INSIDE_HOME = "/tmp/rho-sandbox"
#: the cgroup v1 / v2 mounts a pids limit can be created under (root only)
PIDS_CGROUPS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
HOW_TO = ("install bubblewrap (apt-get install bubblewrap) and allow unprivileged user namespaces "
          "(sysctl kernel.unprivileged_userns_clone=1), or pass --unsafe-no-isolation to run the "
          "generated programs without operating-system isolation")


@dataclasses.dataclass(frozen=True)
class Isolation:
    """How sandbox workers are isolated: ``kind`` "bubblewrap" or "none" (the unsafe opt-in)."""

    kind: str
    bwrap: str | None = None
    #: "cgroup" (root: a pids cgroup per worker), "rlimit" (RLIMIT_NPROC) or "none"
    process_limit: str = "none"
    cgroup_root: str | None = None

    @property
    def isolated(self) -> bool:
        return self.kind == "bubblewrap"

    def describe(self) -> dict[str, str]:
        """What a run's settings record."""
        if not self.isolated:
            return {"kind": "none", "note": "programs ran without operating-system isolation (--unsafe-no-isolation)"}
        return {"kind": "bubblewrap", "namespaces": "user, mount, pid, net, ipc, uts, cgroup",
                "filesystem": f"read-only, private /tmp tmpfs ({TMPFS_BYTES // 2**20} MiB)",
                "process_limit": self.process_limit}

    def wrap(self, argv: list[str], env: dict[str, str], cgroup: "PidsCgroup | None") -> list[str]:
        """The command line that runs ``argv`` (with exactly ``env``) inside the isolation."""
        if not self.isolated:
            return argv
        command = [self.bwrap, *bwrap_arguments(env), "--", *argv]
        if cgroup is not None:  # the shell joins the cgroup, then becomes bwrap: all it starts is counted
            command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup.procs), *command]
        return command

    def new_cgroup(self) -> "PidsCgroup | None":
        return PidsCgroup.create(Path(self.cgroup_root)) if self.process_limit == "cgroup" else None


def bwrap_arguments(env: dict[str, str]) -> list[str]:
    args = ["--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", "65534", "--gid", "65534", "--hostname", "sandbox",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--dir", INSIDE_HOME, "--chdir", INSIDE_HOME,
            "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args


class PidsCgroup:
    """A ``pids`` cgroup of its own for one worker (root only): every task the worker and its programs
    start counts against ``pids.max``, whatever uid they run as."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, root: Path) -> "PidsCgroup":
        path = root / f"rho-sandbox-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return cls(path)

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def tasks(self) -> int:
        try:
            return int((self.path / "pids.current").read_text())
        except (OSError, ValueError):
            return 0

    def limit(self, tasks: int) -> None:
        (self.path / "pids.max").write_text(str(tasks))

    def remove(self) -> None:
        try:
            self.path.rmdir()  # empty once every task has exited
        except OSError:
            pass


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[Isolation | None, str]:
    """(the isolation this machine gives, or None; why not)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed"
    try:
        proc = subprocess.run([bwrap, *bwrap_arguments({"PATH": "/usr/bin:/bin"}), "--", "/bin/true"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"bwrap did not run ({err})"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        return None, f"bwrap cannot create its namespaces here ({lines[-1]})"
    if os.geteuid() != 0:
        return Isolation("bubblewrap", bwrap, "rlimit"), ""
    for root in PIDS_CGROUPS:  # root: RLIMIT_NPROC is not enforced for uid 0, a pids cgroup is
        if (root / "cgroup.procs").is_file():
            try:
                probe = PidsCgroup.create(root)
            except OSError:
                continue
            ok = (probe.path / "pids.max").exists()
            probe.remove()
            if ok:
                return Isolation("bubblewrap", bwrap, "cgroup", str(root)), ""
    return None, "running as root, the process limit needs a pids cgroup, and none can be created here"


def choose_isolation(allow_unsafe: bool = False) -> Isolation:
    """The OS isolation for sandbox workers; without one, NotAvailableError (one line: why, and how
    to enable it), or no isolation when the user opted in."""
    isolation, why = _probe()
    if isolation is not None:
        return isolation
    if allow_unsafe:
        return Isolation("none")
    raise NotAvailableError(f"rho eval runs generated programs under operating-system isolation, and {why}: {HOW_TO}")
