"""One rank of ``rho train``: started by rho's launcher (elastic API), by torchrun, or in-process.

Turns the engine's exceptions into rho errors. When started by the launcher, an error is also written
to ``RHO_ERROR_DIR/rankN.json`` so the parent can print the rank's one-line message and exit with the
right code (torch's elastic agent only reports "child failed").
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from rhocli.errors import BadInputError, MismatchError, NonFiniteError, Preempted, RhoError, UsageError


def run_rank(spec_dict: dict[str, Any], on_event=None) -> dict[str, Any] | None:
    """Run this process's rank; raises RhoError subclasses."""
    from parallel import trainer as engine
    from parallel.checkpoint import CheckpointError
    from parallel.distributed import destroy_distributed, init_distributed
    from rhocli.train_spec import spec_from_dict

    spec = spec_from_dict(spec_dict)
    try:
        try:
            layout = init_distributed(spec.train.tp, spec.train.pp, spec.train.seed)
        except ValueError as err:
            raise UsageError(str(err)) from None
        handler = on_event if (on_event is not None and layout.rank == 0) else None
        try:
            return engine.Trainer(spec, layout, on_event=handler).run()
        except engine.NonFiniteError as err:
            raise NonFiniteError(str(err)) from None
        except engine.Preempted as err:
            raise Preempted(f"{err}; continue with: rho train ... --resume") from None
        except CheckpointError as err:
            raise MismatchError(str(err)) from None
        except ValueError as err:
            raise UsageError(str(err)) from None
    finally:
        destroy_distributed()


def launched_worker(spec_dict: dict[str, Any], quiet: bool, error_dir: str) -> dict[str, Any] | None:
    """Entry point of each process the launcher starts (must be importable: spawn)."""
    from rhocli.commands.train_render import TrainRenderer
    from rhocli.megatron_io import quiet_megatron

    quiet_megatron()
    renderer = None if quiet else TrainRenderer()
    try:
        return run_rank(spec_dict, on_event=renderer)
    except RhoError as err:
        report_error(error_dir, err.exit_code, str(err))
        sys.exit(err.exit_code)
    except Exception as err:  # a bug: report it as such, with its type
        report_error(error_dir, 1, f"internal error on rank {os.environ.get('RANK')}: {type(err).__name__}: {err}")
        raise
    finally:
        if renderer is not None:
            renderer.close()


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


__all__ = ["run_rank", "launched_worker", "first_reported_error", "BadInputError"]
