"""``rho select`` as a library: static token selection from score stores, written as a mask store.

Scores per token (document-aligned, from ``rho score``), the online score functions with the base
model's scores standing in for the training model's loss (``parallel.score_functions``):

* ``excess``    = base-model loss − reference loss (``--base-scores`` needed): high excess is kept
                  (TokenCleaning's static selection; Rho-1's criterion with a frozen training model);
* ``reference`` = − reference loss: the tokens the reference model finds most predictable are kept;
* ``training``  = base-model loss (``--base-scores``): the hardest tokens for the base model;
* ``entropy``   = − the reference model's entropy (``rho score --entropy`` wrote ``SCORES.entropy``);
* ``random``    = a uniform draw per token from ``--seed``: the control at the same ratio;
* two joined by ``&`` / ``|``: the tokens in both / either of their selections.

Scopes: top k of each ``document``, or of the ``global`` corpus. k = floor(ratio · n + 0.5) (the
rounding of the fused op); ties go to the lower token index; NaN scores rank last. ``filter`` is the
document-level baseline (perplexity filtering when ``--score reference``): whole documents ranked by
their mean score, kept best first while the kept tokens stay within k of the corpus (a document
that would overshoot is skipped and smaller ones further down may still fit). Output: a mask
store (``rhocli.core.formats.masks``: uint8 0/1 per token, same document boundaries).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np

from cuda_ext.reference import selection_k
from rhocli.core.errors import MismatchError, UsageError


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    scores: str
    output: str
    ratio: float
    base_scores: str | None = None
    scope: Literal["document", "global", "filter"] = "document"
    score: str = "excess"
    seed: int = 0
    report: str | None = None
    report_documents: int = 20
    force: bool = False


@dataclasses.dataclass
class SelectSummary:
    output: str
    documents: int
    tokens: int
    kept: int
    mean_score: float
    per_document_kept: dict[str, float]


def top_k_mask(values: np.ndarray, k: int) -> np.ndarray:
    """bool mask of the k largest values; ties to the lower index; NaN last."""
    n = values.size
    mask = np.zeros(n, dtype=bool)
    if k <= 0:
        return mask
    if k >= n:
        mask[:] = True
        return mask
    keys = np.where(np.isnan(values), -np.inf, values)
    # stable sort on -key keeps index order among equal keys: lower index first
    order = np.argsort(-keys, kind="stable")
    mask[order[:k]] = True
    return mask


def document_filter_mask(values: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """Whole documents, best mean score first (ties to the lower document index; documents with no
    finite score last), kept while the total stays within k tokens."""
    ends = np.concatenate([[0], np.cumsum(lengths)])
    means = np.full(lengths.size, -np.inf)
    for d in range(lengths.size):
        doc = values[ends[d]:ends[d + 1]]
        doc = doc[np.isfinite(doc)]
        if doc.size:
            means[d] = doc.mean()
    mask = np.zeros(values.size, dtype=bool)
    total = 0
    for d in np.argsort(-means, kind="stable"):
        n = int(lengths[d])
        if n and total + n <= k:
            mask[ends[d]:ends[d + 1]] = True
            total += n
    return mask


def _values(name: str, aligned: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """One score function's per-token values (higher is kept first)."""
    ref = aligned["--scores"]
    if name == "excess":
        return aligned["--base-scores"] - ref
    if name == "training":
        return aligned["--base-scores"].copy()
    if name == "reference":
        return -ref
    if name == "entropy":
        return -aligned["entropy"]
    return np.random.default_rng(seed).random(ref.size, dtype=np.float32)  # random


def _mask(values: np.ndarray, lengths: np.ndarray, scope: str, ratio: float) -> np.ndarray:
    """The tokens ``values`` keeps at ``ratio`` in ``scope``."""
    if scope == "global":
        return top_k_mask(values, selection_k(values.size, ratio))
    if scope == "filter":
        return document_filter_mask(values, lengths, selection_k(values.size, ratio))
    ends = np.concatenate([[0], np.cumsum(lengths)])
    mask = np.zeros(values.size, dtype=bool)
    for d in range(lengths.size):
        a, b = ends[d], ends[d + 1]
        mask[a:b] = top_k_mask(values[a:b], selection_k(int(b - a), ratio))
    return mask


def run_select(cfg: SelectConfig) -> SelectSummary:
    if not 0.0 < cfg.ratio <= 1.0:
        raise UsageError(f"--ratio must be in (0, 1] (a mask that keeps nothing trains nothing), got {cfg.ratio}")
    from parallel.score_functions import parse_score

    try:
        names, op = parse_score(cfg.score)
    except ValueError as err:
        raise UsageError(f"--score {err}") from None
    for name in names:
        if name in ("excess", "training") and not cfg.base_scores:
            raise UsageError(f"--score {name} needs --base-scores (the base model's scores of the same tokens)")
    from rhocli.core.formats.staging import check_outputs_free

    # both outputs are checked before either is written: a refused report must not leave a new mask
    check_outputs_free([Path(cfg.output + ext) for ext in (".bin", ".idx", ".json")]
                       + ([Path(cfg.report)] if cfg.report else []), cfg.force)
    from rhocli.core.formats.manifest import check_fingerprint
    from rhocli.core.formats.masks import write_mask_store
    from rhocli.core.formats.scores import entropy_prefix, open_scores

    ref_store = open_scores(cfg.scores, "--scores ")
    check_fingerprint(cfg.scores, ref_store.manifest, "--scores ")  # the content, not only its manifest
    ref_manifest, lengths, ref = ref_store.manifest, ref_store.lengths, ref_store.values
    token_fp = (ref_manifest.get("token_dataset") or {}).get("fingerprint")
    aligned = {"--scores": ref}

    def companion(flag: str, prefix: str):  # another store of exactly these tokens
        store = open_scores(prefix, f"{flag} ")
        check_fingerprint(prefix, store.manifest, f"{flag} ")
        if (store.manifest.get("token_dataset") or {}).get("fingerprint") != token_fp or not np.array_equal(store.lengths, lengths):
            raise MismatchError(f"{flag} {prefix}: scores other tokens than --scores {cfg.scores}")
        return store.values

    if cfg.base_scores and any(n in ("excess", "training") for n in names):
        aligned["--base-scores"] = companion("--base-scores", cfg.base_scores)
    if "entropy" in names:
        if not Path(entropy_prefix(cfg.scores) + ".json").is_file():
            raise UsageError(f"--score entropy needs {entropy_prefix(cfg.scores)} (the reference entropy: "
                             f"rho score --entropy)")
        aligned["entropy"] = companion("--scores", entropy_prefix(cfg.scores))
    per_function = {name: _values(name, aligned, cfg.seed) for name in names}
    masks = [_mask(per_function[name], lengths, cfg.scope, cfg.ratio) for name in names]
    mask = masks[0] if op is None else (masks[0] & masks[1] if op == "&" else masks[0] | masks[1])
    values = per_function[names[0]]  # the report's histogram and token colours: the first function
    ends = np.concatenate([[0], np.cumsum(lengths)])
    kept_per_doc = np.array([mask[ends[d]:ends[d + 1]].mean() if lengths[d] else 0.0 for d in range(lengths.size)])
    finite = values[np.isfinite(values)]
    hist, edges = np.histogram(finite, bins=40) if finite.size else (np.zeros(0), np.zeros(1))
    report_path = Path(cfg.report) if cfg.report else None
    manifest = write_mask_store(cfg.output, mask, lengths, force=cfg.force, fields={
        "token_dataset": ref_manifest.get("token_dataset"),
        "scores": {"reference": {"prefix": cfg.scores, "fingerprint": ref_manifest.get("fingerprint")},
                   "base": ({"prefix": cfg.base_scores} if cfg.base_scores else None)},
        "selection": {"score": cfg.score, "scope": cfg.scope, "ratio": cfg.ratio,
                      **({"seed": cfg.seed} if "random" in names else {}),
                      "rounding": "k = floor(ratio * n + 0.5); ties to the lower index; NaN last"},
        "kept": int(mask.sum()), "tokens": int(mask.size),
        "statistics": {
            "score_histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in hist]},
            "kept_fraction_per_document": {q: float(np.percentile(kept_per_doc, p)) for q, p in
                                           (("min", 0), ("p10", 10), ("median", 50), ("p90", 90), ("max", 100))}
            if kept_per_doc.size else {},
        },
    })
    if report_path is not None:
        from rhocli.select.report import write_selection_report

        write_selection_report(report_path, ref_manifest, lengths, values, mask, ref, cfg, hist, edges, force=cfg.force)
    return SelectSummary(cfg.output, int(lengths.size), int(mask.size), int(mask.sum()),
                         float(finite.mean()) if finite.size else float("nan"),
                         manifest["statistics"]["kept_fraction_per_document"])
