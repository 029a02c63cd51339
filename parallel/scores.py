"""The score store: per-token reference losses with the same document boundaries as a token dataset.

``SCORES.bin`` / ``SCORES.idx`` are a megatron ``IndexedDataset`` of float32, one sequence per
document, each as long as the token document it scores; ``SCORES.json`` is the manifest (format
``rho.scores``, version 1). Value ``i`` of document ``d`` is the reference model's loss for predicting
token ``i`` of ``d``; the first token is predicted from the end-of-document id alone (as it follows
an EOD in training). Documents longer than the scoring context are scored with a sliding window
(``window_tokens`` of context, advancing by ``stride``; every token after the first window has at
least ``window_tokens - stride`` tokens of context). See docs/score.md.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

SCORES_FORMAT = "rho.scores"
SCORES_FORMAT_VERSION = 1


class ScoreStoreError(ValueError):
    """A score store that is missing, incomplete or does not match its token dataset."""


def read_scores_manifest(prefix: str | Path) -> dict:
    from parallel.manifest import read_versioned_json

    path = Path(str(prefix) + ".json")
    if not path.is_file():
        raise ScoreStoreError(f"{path}: score store manifest not found")
    return read_versioned_json(path, SCORES_FORMAT, SCORES_FORMAT_VERSION, ScoreStoreError, "score store")


@dataclasses.dataclass(frozen=True)
class Window:
    """One forward pass over ``[EOD] + document`` positions [start, start + len(inputs))."""

    document: int
    #: input ids: [length <= window]
    inputs: list[int]
    #: next-token labels: [length]
    labels: list[int]
    #: positions (within the document) whose score this window provides, and where they sit in it
    doc_positions: range
    window_positions: range


def document_windows(doc_index: int, tokens: list[int], eod: int, window: int, stride: int) -> Iterator[Window]:
    """Windows that score every token of a document exactly once (docstring of the module)."""
    extended = [eod] + list(tokens)  # e[0] = EOD, e[i + 1] = token i
    n = len(tokens)
    if n == 0:
        return
    # first window: labels e[1..min(window, n)] -> tokens 0..w-1
    first = min(window, n)
    yield Window(doc_index, extended[0:first], extended[1:first + 1], range(0, first), range(0, first))
    scored = first
    start = 0
    while scored < n:
        start += stride
        end = min(start + window, n)  # labels e[start+1 .. end] -> tokens start..end-1
        new = range(scored, end)
        yield Window(
            doc_index,
            extended[start:end],
            extended[start + 1:end + 1],
            new,
            range(scored - start, end - start),
        )
        scored = end
