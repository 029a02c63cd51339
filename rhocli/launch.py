"""Starting ranks: in this process (one rank, or under torchrun), or tp x pp x dp worker processes
through torch's elastic launcher API. Workers report a RhoError through ``RHO_ERROR_DIR`` files
(``rhocli.train_worker``) so the launching process can print the worker's one line and exit code."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_ranks(world: int, in_process: Callable[[], Any], worker: Callable, worker_args: tuple) -> None:
    """Run ``in_process()`` here when possible, else ``worker(*worker_args, error_dir)`` on ``world`` processes."""
    from rhocli.errors import WorkerError

    if under_torchrun() or world == 1:
        if not under_torchrun():
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        in_process()
        return

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from rhocli.train_worker import first_reported_error

    error_dir = tempfile.mkdtemp(prefix="rho-errors-")
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
        start_method="spawn", monitor_interval=0.5, shutdown_timeout=600,
    )
    try:
        elastic_launch(launch, worker)(*worker_args, error_dir)
    except ChildFailedError as err:
        reported = first_reported_error(error_dir)
        if reported is None:
            failures = getattr(err, "failures", {}) or {}
            summary = ", ".join(f"rank {r}: exit {f.exitcode}" for r, f in sorted(failures.items())) or str(err)
            raise WorkerError(f"a worker died without a message ({summary})") from None
        code, message = reported
        raise error_for(code, message) from None


def error_for(code: int, message: str):
    from rhocli import errors

    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.RhoError) and cls is not errors.RhoError and cls.exit_code == code:
            return cls(message)
    return errors.WorkerError(message)
