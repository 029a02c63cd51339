"""How ``rho score`` cuts a document into forward passes: every token scored exactly once.

The first token of a document is predicted from the end-of-document id alone (as it follows an EOD
in training). Documents longer than the scoring context are scored with a sliding window
(``window_tokens`` of context, advancing by ``stride``; every token after the first window has at
least ``window_tokens - stride`` tokens of context). See docs/score.md; the store the scores go into
is ``rhocli.core.formats.scores``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator


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
