"""The selection trace: what a selective run trained on, token by token, for its first steps.

``rho train --trace-selection N`` writes ``RUN/selection_trace/step_SSSSSS.dpD.npz`` for steps 1..N,
one file per data-parallel rank: numpy arrays (``parallel.loss.TRACE_FIELDS``) over the rows the rank
trained at that step: ``samples`` [n] (global sample numbers), and [n, seq_length] ``tokens``,
``labels``, ``loss_mask``, ``loss`` (the training model's per-token loss), ``kept`` (selected), and
the selection's inputs the run had (``ref_loss``, ``ref_entropy``, ``random``). Each file is written
under a temporary name and renamed, so a file that exists is whole. ``read_trace`` gives a step's
rows in sample order whatever the DP size.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from rhocli.core.errors import MissingInputError

DIR_NAME = "selection_trace"
_NAME = re.compile(r"step_(\d{6})\.dp(\d+)\.npz$")


class TraceWriter:
    """The trainer's ``trace`` sink for a run directory."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / DIR_NAME

    def __call__(self, step: int, dp_rank: int, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step_{step:06d}.dp{dp_rank}.npz"
        tmp = final.with_name("." + final.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **record)
        os.replace(tmp, final)


def traced_steps(run_dir: str | Path) -> list[int]:
    folder = Path(run_dir) / DIR_NAME
    steps = {int(m.group(1)) for p in folder.glob("step_*.npz") if (m := _NAME.search(p.name))}
    return sorted(steps)


def read_trace(run_dir: str | Path, step: int) -> dict[str, np.ndarray]:
    """Step ``step``'s traced rows of every DP rank, in global sample order."""
    folder = Path(run_dir) / DIR_NAME
    files = sorted(folder.glob(f"step_{step:06d}.dp*.npz"))
    if not files:
        raise MissingInputError(f"{folder}: no selection trace of step {step} (train with --trace-selection N)")
    parts = []
    for path in files:
        with np.load(path) as data:
            parts.append({k: data[k] for k in data.files})
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(merged["samples"], kind="stable")
    return {k: v[order] for k, v in merged.items()}
