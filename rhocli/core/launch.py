"""Starting the ranks of a distributed stage (``rho train``, ``rho score``): in this process (one rank,
or each process under torchrun), or tp x pp x dp worker processes started by
``torch.multiprocessing.start_processes`` (see ``run_ranks`` for why not torch's elastic agent).

The stage hands down what to run, the way megatron-core's ``pretrain`` takes ``forward_step``:

    run_ranks(world, entry, spec_dict, renderer)

``entry(spec_dict, renderer)`` runs one rank (a module-level function: spawned workers import it by
name); ``renderer`` is a class whose instance, on rank 0 only, receives the stage's events (None:
quiet). A launched worker that fails writes its error's exit code (``rhocli.core.errors``' one table)
and its one line to ``rankN.json`` in an error directory, because a process's exit code is all its
parent sees; the launching process raises that category with that line. The error directory is
removed however the run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
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
    from rhocli.core.errors import category_for, exit_code_for, one_line
    from rhocli.core.processes import TerminatedSignal, die_with_parent, stacks_on_sigusr1, terminate_as_interrupt

    die_with_parent()  # no rank outlives a kill -9 of the launching rho
    stacks_on_sigusr1()
    # a forked rank inherits the launcher's handlers (they pass signals on to the ranks): a rank
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
            report_error(error_dir, exit_code_for(err), one_line(err))
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


#: how often the launcher looks at its ranks
MONITOR_INTERVAL_S = 0.5
#: how long ranks that were told to stop (a signal, a failed peer) may take to save and exit
#: before they are killed: a SIGTERM'd trainer writes its checkpoint first
STOP_TIMEOUT_S = 600.0
#: the signals the launcher passes on to its ranks (a scheduler's SIGTERM, a terminal's hang-up...)
FORWARDED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n))


def _outlive_a_dead_peer() -> None:
    """Before a rank exits with an internal error, give the launcher time to see the rank that may
    have caused it. A rank killed with -9 (or by the OOM killer) makes its peers fail on their next
    collective at once ("Connection reset by peer"); a peer that exited in the same polling interval
    could be blamed instead of the killed rank. Waiting three intervals lets the launcher find the
    killed one first; a signal meanwhile (the launcher stopping this rank) ends the wait, without
    another message."""
    import time

    try:
        time.sleep(3 * MONITOR_INTERVAL_S)
    except BaseException:
        pass


def run_ranks(world: int, entry: Entry, spec_dict: dict[str, Any], renderer_cls: type | None) -> None:
    """Run ``entry`` here when possible, else on ``world`` processes started by
    ``torch.multiprocessing.start_processes`` on this machine.

    Why not torch's elastic agent (``torchrun``'s engine, used here until 2026-12): its ranks are
    started after it has begun its rendezvous threads (TCPStore servers, heartbeats), and a rank
    forked from a process with running threads may inherit a lock held at that instant. CI saw it:
    a forked rank waited forever inside ``init_process_group``'s TCPStore constructor (twice in
    ~4 suite runs, ~150 launches each). Here the ranks are started first, from a process that has
    started no thread of its own, and rank 0 hosts the rendezvous store (``env://``). Multi-node
    runs use torchrun itself (``under_torchrun``)."""
    if under_torchrun() or world == 1:
        single_rank_env()
        run_stage(entry, spec_dict, renderer_cls)
        return

    gpus = _gpu_count()
    if gpus and world > gpus:
        from rhocli.core.errors import NotAvailableError

        raise NotAvailableError(f"this run starts {world} processes, one per GPU (--tp x --pp x --cp x --dp), and this "
                                f"machine has {gpus}: lower the sizes, or start it across nodes with torchrun")

    import torch.multiprocessing as torch_mp

    # the workers' error reports, removed however the run ends
    _remove_dead_launchers_dirs()
    error_dir = tempfile.mkdtemp(prefix=f"rho-launch-{os.getpid()}-")
    received: list[int] = []
    ranks: list = []

    def pass_on(signum, _frame):  # to every rank still running, as torchrun's agent does
        received.append(signum)
        _signal_alive(ranks, signal.SIGKILL if len(received) > 1 else signum)  # a second one: at once

    previous = {sig: signal.signal(sig, pass_on) for sig in FORWARDED_SIGNALS}
    try:
        context = torch_mp.start_processes(_rank_process, args=(world, free_port(), entry, spec_dict, renderer_cls, error_dir),
                                           nprocs=world, join=False, start_method=start_method())
        ranks.extend(context.processes)
        failures = _watch(ranks, received)
        if received:
            error = _signal_error(received[0], first_reported_error(error_dir))
        else:
            error = _failure(error_dir, failures) if failures else None
    finally:
        _signal_alive(ranks, signal.SIGKILL)  # nothing outlives the launcher, however it ends
        for rank in ranks:
            rank.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(error_dir, ignore_errors=True)
    if error is not None:
        raise error


def _rank_process(local_rank: int, world: int, port: int, entry: Entry, spec_dict: dict[str, Any],
                  renderer_cls: type | None, error_dir: str) -> None:
    """One launched rank: the environment torchrun would give it, then ``launched_rank``."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # rank 0 hosts the store, not an agent
    launched_rank(entry, spec_dict, renderer_cls, error_dir)


def _signal_alive(ranks: list, signum: int) -> None:
    for rank in ranks:
        if rank.exitcode is None and rank.pid is not None:
            try:
                os.kill(rank.pid, signum)
            except ProcessLookupError:
                pass


def _watch(ranks: list, received: list[int]) -> dict[int, int]:
    """Wait for the ranks: all done (returns {}), one failed (the others are stopped; returns
    {rank: exit code} of those that had failed when it was seen), or a signal passed on (waits for
    the ranks to save and exit; returns {})."""
    import time
    from multiprocessing.connection import wait

    stop_deadline = None
    while any(r.exitcode is None for r in ranks):
        wait([r.sentinel for r in ranks if r.exitcode is None], timeout=MONITOR_INTERVAL_S)
        if stop_deadline is None and received:
            stop_deadline = time.monotonic() + STOP_TIMEOUT_S
        failed = {i: r.exitcode for i, r in enumerate(ranks) if r.exitcode not in (None, 0)}
        if failed and not received:
            _signal_alive(ranks, signal.SIGTERM)
            _join_all(ranks, STOP_TIMEOUT_S)
            return failed
        if stop_deadline is not None and time.monotonic() > stop_deadline:
            _signal_alive(ranks, signal.SIGKILL)
    return {}


def _join_all(ranks: list, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    for rank in ranks:
        rank.join(max(0.0, deadline - time.monotonic()))
    _signal_alive(ranks, signal.SIGKILL)


def _signal_error(signum: int, reported: tuple[int, str] | None):
    """The error of a launcher that was signalled and passed it on: what a rank that saved and
    stopped said (SIGTERM in training: exit 12), else the signal itself."""
    from rhocli.core.errors import Interrupted, Terminated

    if reported is not None and reported[0] != 1:
        return error_for(*reported)
    if signum == signal.SIGINT:
        return Interrupted("interrupted; only complete outputs are published")
    return Terminated(f"terminated ({signal.Signals(signum).name}); only complete outputs are published")


def _gpu_count() -> int:
    """GPUs this process may use (0 without CUDA): each launched rank takes one."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _failure(error_dir: str, failures: dict[int, int]):
    """The error to raise when workers failed: a rank killed by a signal (the others then fail on
    their connections to it) before anything a rank reported, else the lowest rank's report.

    Only the ranks in ``failures`` (those that had ended when the launcher saw the failure) count:
    the others were then stopped by the launcher's own SIGTERM, and what they report ("terminated")
    is its consequence, not the cause. CI saw it: rank 1 killed with -9 while rank 0 was between
    collectives; rank 0 then reported the launcher's SIGTERM, and the run ended "terminated"."""
    from rhocli.core.errors import WorkerError

    reported = first_reported_error(error_dir, ranks=set(failures))
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


def _remove_dead_launchers_dirs() -> None:
    """The error directories of launchers that were killed (SIGKILL: no clean-up ran), found by the
    PID in their name: removed by the next launcher. A live launcher's is left alone."""
    import psutil

    for path in Path(tempfile.gettempdir()).glob("rho-launch-*-*"):
        try:
            pid = int(path.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if not psutil.pid_exists(pid):
            shutil.rmtree(path, ignore_errors=True)


def report_error(error_dir: str, code: int, message: str) -> None:
    path = Path(error_dir) / f"rank{int(os.environ.get('RANK', 0)):05d}.json"
    path.write_text(json.dumps({"code": code, "message": message}))


def first_reported_error(error_dir: str, ranks: set[int] | None = None) -> tuple[int, str] | None:
    """The lowest rank's reported (exit code, message), preferring user errors over crashes; only
    from ``ranks`` when given."""
    reports = []
    for path in sorted(Path(error_dir).glob("rank*.json")):
        if ranks is not None and int(path.stem[4:]) not in ranks:
            continue
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
