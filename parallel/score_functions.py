"""The names of selective training's score functions, and its kept-fraction schedule: plain Python,
shared by the engine (``parallel.loss``, online) and ``rho select`` (offline) without importing torch.

A score is one function or two joined by ``&`` (the tokens both keep) or ``|`` (either keeps):
``excess``, ``reference``, ``training``, ``entropy``, ``random``; ``parallel.loss.score_values``
says what each ranks by.
"""

from __future__ import annotations

#: what a token can be ranked by (the higher the value, the sooner it is kept); see ``score_values``
SCORE_FUNCTIONS = ("excess", "reference", "training", "entropy", "random")
#: the micro-batch inputs each function reads, beside the training model's own loss
SCORE_INPUTS = {"excess": ("ref_loss",), "reference": ("ref_loss",), "training": (), "entropy": ("ref_entropy",),
                "random": ("random",)}


def parse_score(text: str) -> tuple[tuple[str, ...], str | None]:
    """``excess`` -> (("excess",), None); ``reference&entropy`` -> (("reference", "entropy"), "&"): the
    tokens in both top-k sets (``|``: in either). ValueError names what is wrong."""
    text = text.strip()
    op = "&" if "&" in text else "|" if "|" in text else None
    names = tuple(n.strip() for n in (text.split(op) if op else [text]))
    bad = [n for n in names if n not in SCORE_FUNCTIONS]
    if bad or len(names) > 2 or (op and len(names) != 2) or (op and names[0] == names[1]):
        raise ValueError(f"{text!r}: expected one of {', '.join(SCORE_FUNCTIONS)}, or two of them joined by "
                         f"& (kept by both) or | (kept by either)")
    return names, op


def score_inputs(score: str) -> set[str]:
    """The micro-batch inputs a score reads (``ref_loss``, ``ref_entropy``, ``random``)."""
    names, _ = parse_score(score)
    return {i for n in names for i in SCORE_INPUTS[n]}


def ratio_at(step: int, ratio: float, start: float | None, after: int, steps: int) -> float:
    """The fraction of tokens kept at (0-based) ``step``: every token during the warm-up
    (``step < after``), then ``start`` moving linearly to ``ratio`` at the last step (constant
    ``ratio`` without a start)."""
    if step < after:
        return 1.0
    if start is None:
        return ratio
    span = max(1, steps - 1 - after)
    return start + (ratio - start) * min(1.0, (step - after) / span)
