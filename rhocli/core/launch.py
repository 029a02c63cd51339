"""Starting the ranks of a distributed stage (``rho train``, ``rho score``): in this process (one rank,
or each process under torchrun), or tp x pp x dp worker processes through torch's elastic launcher.

The stage hands down what to run, the way megatron-core's ``pretrain`` takes ``forward_step``:

    run_ranks(world, entry, spec_dict, renderer)

``entry(spec_dict, renderer)`` runs one rank (a module-level function: spawned workers import it by
name); ``renderer`` is a class whose instance, on rank 0 only, receives the stage's events (None:
quiet). A launched worker that fails writes its error's exit code (``rhocli.core.errors``' one table)
and its one line to ``rankN.json`` in an error directory, because torch's elastic agent only reports
"child failed"; the launching process raises that category with that line. The error directory and
the agent's log directory share one scratch directory, removed however the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

Entry = Callable[[dict[str, Any], Any], Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_from_env() -> int | None:
    """WORLD_SIZE under torchrun; None otherwise."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else None


def single_rank_env() -> None:
    """The environment of a one-process group on this machine (a free port), unless under torchrun."""
    if not under_torchrun():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def run_stage(entry: Entry, spec_dict: dict[str, Any], renderer_cls: type | None) -> Any:
    """This process's rank, rendering rank 0's events unless ``renderer_cls`` is None."""
    from rhocli.core.megatron_io import quiet_megatron

    quiet_megatron()
    is_rank0 = int(os.environ.get("RANK", 0)) == 0
    renderer = renderer_cls() if (renderer_cls is not None and is_rank0) else None
    try:
        return entry(spec_dict, renderer)
    finally:
        if renderer is not None:
            renderer.close()


def launched_rank(entry: Entry, spec_dict: dict[str, Any], renderer_cls: type | None, error_dir: str) -> Any:
    """Entry point of each process the launcher starts (module level: spawn imports it). Whatever ends
    it is reported in one line and an exit code, never a traceback (``RHO_DEBUG=1`` shows a bug's)."""
    from rhocli.core.errors import category_for, exit_code_for
    from rhocli.core.processes import TerminatedSignal, die_with_parent, stacks_on_sigusr1, terminate_as_interrupt

    die_with_parent()  # no rank outlives a kill -9 of the launching rho
    stacks_on_sigusr1()
    # a forked rank inherits the elastic agent's handlers (they raise its SignalException): a rank
    # takes Ctrl-C as KeyboardInterrupt and hang-ups as their default, as a spawned one does
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in ("SIGHUP", "SIGQUIT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    terminate_as_interrupt()  # SIGTERM unwinds (the trainer takes it over while it trains: save, then exit 12)
    try:
        return run_stage(entry, spec_dict, renderer_cls)
    except KeyboardInterrupt:
        report_error(error_dir, 130, "interrupted; only complete outputs are published")
        sys.exit(130)
    except TerminatedSignal:
        report_error(error_dir, 143, "terminated (SIGTERM); only complete outputs are published")
        sys.exit(143)
    except Exception as err:
        if category_for(err) is not None:
            report_error(error_dir, exit_code_for(err), str(err))
            sys.exit(exit_code_for(err))
        report_error(error_dir, 1, f"internal error on rank {os.environ.get('RANK')}: {type(err).__name__}: {err}")
        if os.environ.get("RHO_DEBUG", "") not in ("", "0"):
            raise
        _outlive_a_dead_peer()
        sys.exit(1)


def start_method() -> str:
    """How the launcher starts its ranks: ``fork`` on a CPU-only machine where a forked child can
    still run torch, else ``spawn``.

    A spawned rank re-imports torch and megatron-core (3.5 s of CPU each: a TP2PP2 run of the tiny
    model on 2 cores spent 10 of its 30 s on it); a forked one starts with what this process
    imported. Fork is not always safe: once this process has run an OpenMP parallel region (a stage
    run in-process first: ``rho demo``, a recipe calling ``invoke``), a forked child hangs in its
    first one (GNU libgomp, measured with torch 2.13), and CUDA does not survive a fork at all. So
    on CPU, a throw-away child is forked first and runs one parallel region; only when it ends in
    time do the ranks fork (``rho train`` / ``rho score`` from the command line launch before any
    tensor work, and do).
    """
    import torch

    if torch.cuda.is_available() or not hasattr(os, "fork"):
        return "spawn"
    return "fork" if _forked_child_runs_torch() else "spawn"


def _forked_child_runs_torch(timeout_s: float = 3.0) -> bool:
    import time

    import torch

    pid = os.fork()
    if pid == 0:  # the probe: one OpenMP parallel region (more elements than at::parallel_for's grain)
        code = 1
        try:
            code = 0 if float(torch.ones(1 << 17).add_(1).sum()) == 2 * (1 << 17) else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


#: how often the elastic agent looks at its workers (LaunchConfig.monitor_interval)
MONITOR_INTERVAL_S = 0.5


def _outlive_a_dead_peer() -> None:
    """Before a rank exits with an internal error, give the agent time to see the rank that may have
    caused it. A rank killed with -9 (or by the OOM killer) makes its peers fail on their next
    collective at once ("Connection reset by peer"); the agent reports only the first failed rank it
    finds, in rank order, so a peer that exits in the same polling interval would be blamed instead
    of the killed rank. Waiting three intervals lets the agent find the killed one first; a signal
    meanwhile (the agent stopping this rank) ends the wait, without another message."""
    import time

    try:
        time.sleep(3 * MONITOR_INTERVAL_S)
    except BaseException:
        pass


def run_ranks(world: int, entry: Entry, spec_dict: dict[str, Any], renderer_cls: type | None) -> None:
    """Run ``entry`` here when possible, else on ``world`` processes started by the elastic API."""
    from rhocli.core.errors import Interrupted, Terminated

    if under_torchrun() or world == 1:
        single_rank_env()
        run_stage(entry, spec_dict, renderer_cls)
        return

    gpus = _gpu_count()
    if gpus and world > gpus:
        from rhocli.core.errors import NotAvailableError

        raise NotAvailableError(f"this run starts {world} processes, one per GPU (--tp x --pp x --cp x --dp), and this "
                                f"machine has {gpus}: lower the sizes, or start it across nodes with torchrun")

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # one scratch directory for the workers' error reports and the elastic agent's own files,
    # removed however the run ends
    scratch = Path(tempfile.mkdtemp(prefix="rho-launch-"))
    error_dir = str(scratch / "errors")
    os.mkdir(error_dir)
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
        start_method=start_method(), monitor_interval=MONITOR_INTERVAL_S, shutdown_timeout=600,
        logs_specs=DefaultLogsSpecs(log_dir=str(scratch / "elastic")),
    )
    # the agent's own log lines (a worker's exit code, its traceback) are noise beside the one line
    # rho prints for whatever ended the run
    for name in [n for n in logging.Logger.manager.loggerDict
                 if n.startswith(("torch.distributed.elastic", "torch.multiprocessing"))]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # each has its own level (torch's get_logger)
    try:
        elastic_launch(launch, launched_rank)(entry, spec_dict, renderer_cls, error_dir)
    except ChildFailedError as err:
        failures = {int(r): f.exitcode for r, f in (getattr(err, "failures", {}) or {}).items()}
        raise _failure(error_dir, failures) from None
    except SignalException as err:
        # the agent forwarded the signal to the workers and waited for them: a rank that saved and
        # stopped (SIGTERM in training: exit 12) has said so
        reported = first_reported_error(error_dir)
        if reported is not None and reported[0] != 1:
            raise error_for(*reported) from None
        if err.sigval == signal.SIGINT:
            raise Interrupted("interrupted; only complete outputs are published") from None
        raise Terminated(f"terminated ({signal.Signals(err.sigval).name}); only complete outputs are published") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _gpu_count() -> int:
    """GPUs this process may use (0 without CUDA): each launched rank takes one."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _failure(error_dir: str, failures: dict[int, int]):
    """The error to raise when workers failed: a rank killed by a signal (the others then fail on
    their connections to it) before anything a rank reported, else the lowest rank's report."""
    from rhocli.core.errors import WorkerError

    reported = first_reported_error(error_dir)
    reporters = {int(p.stem[4:]) for p in Path(error_dir).glob("rank*.json")}
    killed = sorted(r for r, code in failures.items() if code is not None and code < 0 and r not in reporters)
    if killed and (reported is None or reported[0] == 1):
        rank, code = killed[0], failures[killed[0]]
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        return WorkerError(f"worker rank {rank} died from {name} (killed, or out of memory); the run stopped")
    if reported is None:
        summary = ", ".join(f"rank {r}: exit {c}" for r, c in sorted(failures.items())) or "no exit codes"
        return WorkerError(f"a worker died without a message ({summary})")
    return error_for(*reported)


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
    """The category with exit code ``code`` (a worker's bug, code 1: WorkerError), carrying ``message``."""
    from rhocli.core.errors import CATEGORIES, WorkerError

    return next((cls for cls in CATEGORIES if cls.exit_code == code), WorkerError)(message)
