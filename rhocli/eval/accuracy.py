"""Grading records and summing them up: ``grade`` fills a record's ``pred``/``score`` from its ``code``,
``metrics_of`` makes ``metrics.json``'s numbers, and ``regrade`` does both for an existing outputs file
(``rho eval --regrade``), without a model."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from rhocli.eval.grading import equivalent, extract_answer

TIMEOUT_REPORT = "Timeout Error"


def grade(record: dict[str, Any], reference: str) -> dict[str, Any]:
    """``record`` with ``gt``, ``pred`` and ``score`` for each of its generations (``code``)."""
    preds = [extract_answer(code) for code in record["code"]]
    return {**record, "gt": reference, "pred": preds, "score": [equivalent(p, reference) for p in preds]}


def metrics_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The harness's ``metrics.json`` numbers (accuracy in percent, of each record's first generation)
    and, when the records have them, the accuracy per MATH level and per subject."""
    n = len(records)
    firsts = [bool(r["score"][0]) if r.get("score") else False for r in records]
    out: dict[str, Any] = {
        "num_samples": n,
        "num_scores": sum(len(r.get("score") or []) for r in records),
        "acc": round(100.0 * sum(firsts) / n, 1) if n else 0.0,
        "empty_samples": sum(1 for r in records if not (r.get("pred") or [""])[-1]),
        "timeout_samples": sum(1 for r in records if TIMEOUT_REPORT in str((r.get("report") or [None])[-1])),
    }
    for field, key in (("level", "level_acc"), ("type", "type_acc")):
        groups: dict[str, list[bool]] = defaultdict(list)
        for record, ok in zip(records, firsts):
            if field in record:
                groups[str(record[field])].append(ok)
        if groups:
            out[key] = {g: {"acc": round(100.0 * sum(v) / len(v), 1), "num_samples": len(v)}
                        for g, v in sorted(groups.items(), key=lambda kv: _level_order(kv[0]))}
    return out


def _level_order(name: str) -> tuple:
    """"Level 2" / "2" sort as numbers, names alphabetically."""
    digits = "".join(ch for ch in name if ch.isdigit())
    return (0, int(digits), name) if digits else (1, 0, name)


def regrade(path: str | Path, task: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Re-grade an outputs file in the harness's schema: every record's ``code`` extracted and checked
    again, against the reference its raw fields give (``tasks.reference_of``). Returns the graded
    records (with ``harness_score``: the file's own verdicts) and their metrics."""
    from rhocli.core.errors import BadInputError
    from rhocli.core.formats.eval_outputs import read_outputs
    from rhocli.eval.tasks import reference_of

    records = read_outputs(path)
    if not records:
        raise BadInputError(f"--regrade {path}: no records (the file is empty)")
    graded = []
    for number, record in enumerate(records, 1):
        if not record.get("code"):
            raise BadInputError(f"--regrade {path}: record {number} has no 'code' (the generation)")
        if "gt" not in record and "solution" not in record and "answer" not in record:
            raise BadInputError(f"--regrade {path}: record {number} has no reference ('gt', 'solution' or 'answer')")
        new = grade(record, reference_of(record, task))
        if "score" in record:
            new["harness_score"] = record["score"]
        graded.append(new)
    return graded, metrics_of(graded)


def agreement(records: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]] | None:
    """How often the re-graded first verdict equals the file's own (``harness_score``), in percent,
    and the records where they differ; None when the file had no verdicts."""
    judged = [r for r in records if r.get("harness_score")]
    if not judged:
        return None
    differ = [r for r in judged if bool(r["score"][0]) != bool(r["harness_score"][0])]
    return 100.0 * (len(judged) - len(differ)) / len(judged), differ
