"""An exclusive claim on an output that a run writes into over time (a training run directory, an
unfinished score store): a second rho on the same output is refused, naming the holder.

The lock is a small JSON file (host, PID, the process's start time, the command line) created with
``O_CREAT | O_EXCL``, so exactly one process wins. A lock left by a process that died (``kill -9``, a
crashed node) is stale: on the same host, a holder that no longer runs (or whose PID now belongs to a
process started later) is taken over; on another host rho cannot tell, and says which file to remove.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from rhocli.core.errors import InUseError


def _started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when it does not run."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # it runs, as another user
        return 0.0


class OutputLock:
    """``with OutputLock(path, what):`` holds ``path`` for the block; ``what`` names the output."""

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what
        self.held = False

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid()) or time.time(),
                "command": " ".join(sys.argv)}

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        started = _started(holder["pid"])
        # not running, or that PID is now another process, started after the lock was taken
        return started is None or started > float(holder.get("started") or 0) + 1.0

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            # the record is written first and linked into place (link fails if the lock exists): a
            # competitor never reads a lock that is still empty
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._record()) + "\n")
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if self._stale(holder):
                    # take it over atomically: whoever renames it first removes it
                    try:
                        os.replace(self.path, self.path.with_name(self.path.name + f".stale-{os.getpid()}"))
                        os.unlink(self.path.with_name(self.path.name + f".stale-{os.getpid()}"))
                    except FileNotFoundError:
                        pass
                    continue
                who = (f"PID {holder.get('pid')} on {holder.get('host')}" if holder else "an unreadable lock")
                raise InUseError(f"{self.what}: in use by another rho ({who}, {self.path}); wait for it to end, "
                                 f"or remove {self.path} if no rho runs there") from None
            finally:
                tmp.unlink(missing_ok=True)
            self.held = True
            return
        raise InUseError(f"{self.what}: could not take {self.path} (several processes are competing for it)")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
