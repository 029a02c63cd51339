"""A fixed token sample scored with a run's checkpoints: what the analyses read.

The sample is the first documents of a token dataset holding at least N tokens, written as a token
dataset of its own (``OUTPUT/sample``); each checkpoint's scores of it go to
``OUTPUT/scores/step_N`` through ``rho score`` (the caller's ``run_command``: rho's own command line),
so they are ordinary score stores. A store already there for the same sample is reused, so an
interrupted analysis goes on where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class ScoredSample:
    sample: Path  # the sample's token dataset prefix
    fingerprint: str
    steps: list[int]  # the run's checkpoints, in step order
    stores: list[str]  # one score store per checkpoint


def write_sample(data: str, output: Path, sample_tokens: int) -> tuple[Path, str]:
    """(prefix, fingerprint) of the sample of ``data`` in ``output``."""
    from rhocli.core.errors import UsageError
    from rhocli.core.formats.tokens import TokenDataset, write_subset

    if sample_tokens < 1:
        raise UsageError(f"--sample {sample_tokens} must be >= 1")
    lengths = TokenDataset(data).document_lengths()
    documents = int(np.searchsorted(np.cumsum(lengths), sample_tokens) + 1)
    output.mkdir(parents=True, exist_ok=True)
    prefix = output / "sample"
    return prefix, write_subset(data, prefix, documents)["fingerprint"]


def score_sample(model: str | Path, sample: Path, fingerprint: str, prefix: Path, run_command, force: bool,
                 seq_len: int | None) -> str:
    """The sample scored with ``model`` at ``prefix`` (reused when it is there for this sample)."""
    from rhocli.core.formats.scores import read_scores_manifest
    from rhocli.core.formats.tokens import manifest_path

    reusable = not force and manifest_path(prefix).is_file() and \
        (read_scores_manifest(prefix).get("token_dataset") or {}).get("fingerprint") == fingerprint
    if not reusable:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        run_command(["score", "--model", str(model), "--data", str(sample), "--output", str(prefix), "-q", "--force",
                     *(["--seq-len", str(seq_len)] if seq_len else [])])
    return str(prefix)


def score_run_checkpoints(run_dir: Path, data: str, output: Path, sample_tokens: int, run_command, force: bool = False,
                          seq_len: int | None = None, on_scored=None) -> ScoredSample:
    """Every checkpoint of ``run_dir`` scores the sample; ``on_scored(step, done, total)`` follows."""
    from rhocli.core.errors import MissingInputError, UsageError
    from rhocli.core.formats.checkpoint import CheckpointStore

    if not Path(run_dir).is_dir():
        raise MissingInputError(f"{run_dir}: run directory not found")
    checkpoints = CheckpointStore(run_dir).complete_steps()
    if len(checkpoints) < 2:
        raise UsageError(f"{run_dir}: {len(checkpoints)} checkpoint(s); the analysis needs at least two "
                         "(train with --save-interval N)")
    sample, fingerprint = write_sample(data, output, sample_tokens)
    stores = []
    for done, (step, step_dir) in enumerate(checkpoints, 1):
        stores.append(score_sample(step_dir, sample, fingerprint, output / "scores" / step_dir.name, run_command,
                                   force, seq_len))
        if on_scored is not None:
            on_scored(step, done, len(checkpoints))
    return ScoredSample(sample, fingerprint, [s for s, _ in checkpoints], stores)
