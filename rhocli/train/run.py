"""Running a validated ``rho train``: the run directory claimed (one rho per run directory), prepared,
and the ranks started through the launcher with the train rank entry."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

LOCK_NAME = ".rho-lock"


def run_training(spec, world: int, force: bool, renderer_cls: type | None) -> None:
    """Under torchrun every rank calls this; rank 0 holds the run directory's lock."""
    from rhocli.core.launch import run_ranks
    from rhocli.core.lock import OutputLock
    from rhocli.train.rank import run_train_rank
    from rhocli.train.spec import finish_run_dir, prepare_run_dir, spec_to_dict

    # megatron-core's tensor-parallel communication overlap wants one CUDA connection (as for Megatron-LM)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    rank0 = int(os.environ.get("RANK", 0)) == 0
    lock = OutputLock(Path(spec.run_dir) / LOCK_NAME, f"--save {spec.run_dir}") if rank0 else contextlib.nullcontext()
    with lock:
        prepare_run_dir(spec, force)
        try:
            run_ranks(world, run_train_rank, spec_to_dict(spec), renderer_cls)
        finally:
            finish_run_dir(spec)
