"""Take turns, step by step: how ``rho bench train`` alternates two training runs.

Two arms of a comparison run as two ``rho train`` processes at once, but never compute at once:
rank 0 of each waits for its turn before every step and reports when the step is done, so the two
arms' steps interleave A B B A A B ... and each pair of steps sees the same machine (a neighbour's
job, the CPU clock, the page cache) within a second. On a shared 2-core machine that is what turns
±9 % run-to-run noise into a ratio that resolves a few per cent.

The gate is a directory with two FIFOs: ``go`` (the bench writes one byte: "take a step") and
``done`` (rank 0 writes ``r`` once it is ready to train, then ``s`` after each step). A run is gated
only when ``RHO_STEP_GATE`` names such a directory; ``rho train`` otherwise never looks. Other ranks
of a gated run need no gate: they wait for rank 0 in their collectives, idle.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path
from typing import Any, Callable

from rhocli.core.errors import WorkerError

#: names the gate directory of a benchmark's training run (rank 0 waits for its turns)
GATE_ENV = "RHO_STEP_GATE"
READY, STEPPED, GO = b"r", b"s", b"g"


def make_gate(directory: Path) -> Path:
    """The FIFOs of one arm's gate, in a new directory."""
    directory.mkdir(parents=True)
    os.mkfifo(directory / "go")
    os.mkfifo(directory / "done")
    return directory


class RankGate:
    """Rank 0's side: wraps the Trainer's ``on_event`` so that it waits for a turn before each step."""

    def __init__(self, directory: str | Path, last_step: int):
        directory = Path(directory)
        # the bench holds both FIFOs open read-write, so these opens do not block
        self.done = os.open(directory / "done", os.O_WRONLY)
        self.go = os.open(directory / "go", os.O_RDONLY)
        self.last_step = last_step

    def wrap(self, on_event: Callable[[str, Any], None] | None) -> Callable[[str, Any], None]:
        def gated(kind: str, payload: Any) -> None:
            if on_event is not None:
                on_event(kind, payload)
            if kind == "start":  # restored, data built: ready to time steps
                self._signal(READY)
                self._wait_turn()
            elif kind == "step":
                self._signal(STEPPED)
                if payload["step"] < self.last_step:
                    self._wait_turn()
        return gated

    def _signal(self, byte: bytes) -> None:
        os.write(self.done, byte)

    def _wait_turn(self) -> None:
        if os.read(self.go, 1) != GO:  # end of file: every writer closed it (the bench ended)
            raise WorkerError("the rho bench train that gated this run ended (its step gate closed); the run stopped")


def rank_gate(last_step: int) -> RankGate | None:
    """The gate ``RHO_STEP_GATE`` names, or None (an ungated run: every ``rho train`` but a bench's)."""
    directory = os.environ.get(GATE_ENV)
    return RankGate(directory, last_step) if directory else None


class GateKeeper:
    """The bench's side: hands out turns to several gated runs and waits for each step to end."""

    def __init__(self, directories: list[Path], alive: list[Callable[[], bool]]):
        # O_RDWR: opening a FIFO this way never blocks, and keeps it open for both ends
        self.go = [os.open(d / "go", os.O_RDWR) for d in directories]
        self.done = [os.open(d / "done", os.O_RDWR) for d in directories]
        self.alive = alive

    def wait_ready(self) -> None:
        for arm in range(len(self.done)):
            self._expect(arm, READY)

    def step(self, arm: int) -> None:
        """Let ``arm`` take one step and wait until it has."""
        os.write(self.go[arm], GO)
        self._expect(arm, STEPPED)

    def _expect(self, arm: int, byte: bytes) -> None:
        while True:
            ready, _, _ = select.select([self.done[arm]], [], [], 1.0)
            if ready:
                got = os.read(self.done[arm], 1)
                if got != byte:  # rank 0 of that arm is out of step with the gate: its run is not to be timed
                    raise WorkerError(f"arm {arm}'s step gate: expected {byte!r}, got {got!r}; the comparison stopped")
                return
            if not self.alive[arm]():
                raise ArmExited(arm)

    def close(self) -> None:
        for fd in self.go + self.done:
            os.close(fd)


class ArmExited(Exception):
    """A gated run ended before it reported the step it was waited for (it failed)."""

    def __init__(self, arm: int):
        super().__init__(f"arm {arm} exited")
        self.arm = arm


def wait_all(processes: list, timeout: float = 60.0) -> None:
    """After the last turn: let the runs finish (their final save is off, so this is quick)."""
    end = time.monotonic() + timeout
    for p in processes:
        p.wait(timeout=max(0.1, end - time.monotonic()))
