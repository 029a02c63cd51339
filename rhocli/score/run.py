"""Running a validated ``rho score``: the output claimed (one rho per score store), an unfinished run
dropped with ``--force``, and the ranks started through the launcher with the score rank entry."""

from __future__ import annotations

import contextlib
import os


def run_scoring(job, world: int, force: bool, resume: bool, renderer_cls: type | None) -> None:
    """Under torchrun every rank calls this; rank 0 holds the store's lock."""
    from rhocli.core.formats.scores import ScoreStoreWriter
    from rhocli.core.launch import run_ranks
    from rhocli.core.lock import OutputLock
    from rhocli.score.rank import run_score_rank

    rank0 = int(os.environ.get("RANK", 0)) == 0
    lock = OutputLock(job.output + ".rho-lock", f"--output {job.output}") if rank0 else contextlib.nullcontext()
    with lock:
        if force and not resume and rank0:
            from rhocli.core.formats.scores import entropy_prefix

            ScoreStoreWriter(job.output).clear_work()
            ScoreStoreWriter(entropy_prefix(job.output)).clear_work()
        run_ranks(world, run_score_rank, job.to_dict(), renderer_cls)
