"""Starting ranks of a distributed stage (``train``, ``score``): in this process (one rank, or under
torchrun), or tp x pp x dp worker processes through torch's elastic launcher API.

A launched worker that fails writes its RhoError (code and one line) to ``rankN.json`` in an error
directory, because torch's elastic agent only reports "child failed"; the launching process then
prints that line and exits with that code.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _stage(stage: str):
    """(rank entry function, rank-0 renderer class) of a distributed stage."""
    if stage == "train":
        from rhocli.commands.train_render import TrainRenderer
        from rhocli.train_worker import run_rank

        return run_rank, TrainRenderer
    if stage == "score":
        from rhocli.commands.score import ScoreRenderer
        from rhocli.score_run import run_score_rank

        return run_score_rank, ScoreRenderer
    raise ValueError(f"unknown distributed stage {stage!r}")  # programming error


def run_stage(stage: str, spec_dict: dict[str, Any], quiet: bool) -> Any:
    """This process's rank of ``stage``, with rank 0's progress unless ``quiet``."""
    from rhocli.megatron_io import quiet_megatron

    quiet_megatron()
    run, renderer_cls = _stage(stage)
    renderer = None if quiet else renderer_cls()
    try:
        return run(spec_dict, renderer)
    finally:
        if renderer is not None:
            renderer.close()


def launched_rank(stage: str, spec_dict: dict[str, Any], quiet: bool, error_dir: str) -> Any:
    """Entry point of each process the launcher starts (module level: spawn imports it)."""
    from rhocli.errors import RhoError

    try:
        return run_stage(stage, spec_dict, quiet)
    except RhoError as err:
        report_error(error_dir, err.exit_code, str(err))
        sys.exit(err.exit_code)
    except Exception as err:  # a bug: report it as such, with its type
        report_error(error_dir, 1, f"internal error on rank {os.environ.get('RANK')}: {type(err).__name__}: {err}")
        raise


def run_ranks(world: int, stage: str, spec_dict: dict[str, Any], quiet: bool) -> None:
    """Run ``stage`` here when possible, else on ``world`` processes started by the elastic API."""
    from rhocli.errors import WorkerError

    if under_torchrun() or world == 1:
        if not under_torchrun():
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        run_stage(stage, spec_dict, quiet)
        return

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    error_dir = tempfile.mkdtemp(prefix="rho-errors-")
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
        start_method="spawn", monitor_interval=0.5, shutdown_timeout=600,
    )
    try:
        elastic_launch(launch, launched_rank)(stage, spec_dict, quiet, error_dir)
    except ChildFailedError as err:
        reported = first_reported_error(error_dir)
        if reported is None:
            failures = getattr(err, "failures", {}) or {}
            summary = ", ".join(f"rank {r}: exit {f.exitcode}" for r, f in sorted(failures.items())) or str(err)
            raise WorkerError(f"a worker died without a message ({summary})") from None
        code, message = reported
        raise error_for(code, message) from None


def report_error(error_dir: str, code: int, message: str) -> None:
    path = Path(error_dir) / f"rank{int(os.environ.get('RANK', 0)):05d}.json"
    path.write_text(json.dumps({"code": code, "message": message}))


def first_reported_error(error_dir: str) -> tuple[int, str] | None:
    """The lowest rank's reported (exit code, message), preferring user errors over crashes."""
    reports = []
    for path in sorted(Path(error_dir).glob("rank*.json")):
        try:
            data = json.loads(path.read_text())
            reports.append((data["code"] == 1, int(path.stem[4:]), int(data["code"]), str(data["message"])))
        except (OSError, ValueError, KeyError):
            continue
    if not reports:
        return None
    _, _, code, message = min(reports)
    return code, message


def error_for(code: int, message: str):
    from rhocli import errors

    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.RhoError) and cls is not errors.RhoError and cls.exit_code == code:
            return cls(message)
    return errors.WorkerError(message)
