"""``rho analyze context``: where in its samples a selective run keeps tokens, and what the reference's
context changes.

Read from a run's selection trace (``rho train --trace-selection N``: the samples, the training loss,
the reference loss and what was kept, token by token), for each traced step:

* the kept fraction by position within the sample (``POSITION_BINS``: the first 16 labels, the next
  48, the rest), with the mean reference loss and excess there. A reference scored on another context
  than the trained model's (a per-document store under stream packing: the document's earlier
  tokens, not the sample's) shows as a kept fraction that falls with the position;
* with ``other`` (a score store: per-document stores, one per --data prefix, or a sample store), the
  selection recomputed from the same training losses with the other store's reference losses, in the
  run's scope and at the step's ratio, its kept fraction by position, and the overlap (Jaccard) of
  the two kept sets.

The other store's values are read for the traced samples through the run's own data pipeline
(``parallel.data``: megatron's GPTDataset with the run's blend, split, seed and packing).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rhocli.core.errors import MismatchError, MissingInputError, NotAvailableError, UsageError

#: (first position, end) of the position bins within a sample; None: the sample's end
POSITION_BINS = ((0, 16), (16, 64), (64, None))


@dataclasses.dataclass
class ContextReport:
    run: str
    steps: list[int]
    ratio: list[float]
    scope: str
    source: str
    #: per source ("run", and "other" when given): {bin label: {kept_fraction, ref_loss, excess, tokens}}
    by_position: dict[str, dict[str, dict[str, float]]]
    #: Jaccard overlap of the run's kept tokens and the other store's, per step (empty without other)
    jaccard: list[float] = dataclasses.field(default_factory=list)
    other: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _bins(seq_length: int):
    """(label "0-15", start, end) of the bins a sample of ``seq_length`` labels has."""
    bins = [(start, seq_length if end is None else min(end, seq_length)) for start, end in POSITION_BINS if start < seq_length]
    return [(f"{start}-{end - 1}", start, end) for start, end in bins]


def by_position(kept: np.ndarray, candidate: np.ndarray, ref: np.ndarray, loss: np.ndarray) -> dict[str, dict[str, float]]:
    """[n, s] arrays -> per position bin: kept / candidates, mean reference loss and excess there."""
    out = {}
    for label, start, end in _bins(kept.shape[1]):
        c = candidate[:, start:end]
        n = int(c.sum())
        out[label] = {"tokens": n,
                      "kept_fraction": float(kept[:, start:end][c].mean()) if n else float("nan"),
                      "ref_loss": float(ref[:, start:end][c].mean()) if n else float("nan"),
                      "excess": float((loss - ref)[:, start:end][c].mean()) if n else float("nan")}
    return out


def reselect(loss: np.ndarray, ref: np.ndarray, candidate: np.ndarray, ratio: float, scope: str, group: int) -> np.ndarray:
    """The run's selection on another reference: excess rounded as the engine rounds it
    (``parallel.loss.score_values``), top ``ratio`` per sequence or per ``group`` rows (a micro-batch
    across the DP ranks), ties to the lower index (``cuda_ext``'s top-k)."""
    import torch

    from cuda_ext.reference import topk_mask_reference
    from parallel.loss import score_values

    values = score_values("excess", torch.from_numpy(loss), {"ref_loss": torch.from_numpy(ref)})
    cand = torch.from_numpy(candidate)
    if scope == "sequence":
        return topk_mask_reference(values.reshape(-1), cand.reshape(-1), ratio, loss.shape[1]).view(loss.shape).numpy()
    kept = np.zeros(loss.shape, dtype=bool)
    for r in range(0, loss.shape[0], group):
        part = slice(r, r + group)
        kept[part] = topk_mask_reference(values[part].reshape(-1), cand[part].reshape(-1), ratio, None).view(
            loss[part].shape).numpy()
    return kept


def _run_manifest(run: Path) -> dict[str, Any]:
    from rhocli.core.formats import checkpoint as ckpt

    return ckpt.read_manifest(ckpt.resolve_checkpoint(str(run), label="RUN "), label="RUN ")


def other_values(run: Path, manifest: dict[str, Any], other: list[str], samples: np.ndarray) -> tuple[np.ndarray, str]:
    """The other store's reference losses [n, s] for global samples ``samples`` of the run."""
    from rhocli.core.formats.sample_scores import (first_difference, is_sample_store, open_sample_scores,
                                                   pipeline_record)

    train = manifest["config"]["train"]
    if len(other) == 1 and is_sample_store(other[0]):
        store = open_sample_scores(other[0], label="--scores ")
        datasets = manifest.get("datasets") or []
        mine = pipeline_record(train, [(d["fingerprint"], d["weight"]) for d in datasets], manifest["eod_id"])
        diff = first_difference(store.manifest.get("pipeline") or {}, mine)
        if diff:
            raise MismatchError(f"--scores {other[0]}: scores the samples of another data pipeline ({diff})")
        return np.asarray(store.values[samples], dtype=np.float32), "sample store"
    from parallel.data import DataSpec, TokenIds, build_datasets
    from rhocli.core.formats.scores import read_scores_manifest

    datasets = manifest.get("datasets") or []
    if len(other) != len(datasets):
        raise UsageError(f"--scores: give one document store per dataset of the run ({len(datasets)}), or one sample store")
    for prefix, d in zip(other, datasets):
        made_from = (read_scores_manifest(prefix, label="--scores ").get("token_dataset") or {}).get("fingerprint")
        if made_from != d["fingerprint"]:
            raise MismatchError(f"--scores {prefix}: scores another token dataset than the run's {d['prefix']}")
    weights = [d["weight"] for d in datasets]
    with tempfile.TemporaryDirectory(prefix="rho-context-") as cache:
        spec = DataSpec(prefixes=tuple(d["prefix"] for d in datasets),
                        weights=tuple(weights) if len(weights) > 1 and all(w is not None for w in weights) else None,
                        seq_length=train["seq_length"], seed=train["seed"], split=train["split"],
                        token_ids=TokenIds(vocab_size=manifest["vocab_size"], eod=manifest["eod_id"]), cache_dir=cache,
                        scores=tuple(other), eval_prefixes=tuple(train.get("eval_data") or ()),
                        separate_documents=train.get("separate_documents", False),
                        whole_documents=train.get("pack") == "whole")
        valid = train["eval_iters"] * train["global_batch_size"] if train.get("eval_iters", 0) > 0 else 0
        dataset, _ = build_datasets(spec, train["steps"] * train["global_batch_size"], valid)
        rows = [dataset[int(g) % len(dataset)]["ref_loss"].numpy() for g in samples]
    return np.stack(rows).astype(np.float32), "document stores"


def context_report(run: Path, other: list[str] | None = None, steps: list[int] | None = None) -> ContextReport:
    from parallel.score_functions import ratio_at
    from rhocli.core.formats.selection_trace import read_trace, traced_steps

    if not run.is_dir():
        raise MissingInputError(f"RUN {run}: not a run directory")
    traced = traced_steps(run)
    if not traced:
        raise MissingInputError(f"RUN {run}: no selection trace (train with --trace-selection N)")
    steps = [s for s in (steps or traced) if s in traced] or traced
    manifest = _run_manifest(run)
    train = manifest["config"]["train"]
    if train.get("select_ratio") is None:
        raise UsageError(f"RUN {run}: not a selective run (no --select-ratio)")
    if train.get("select_by", "excess") != "excess":
        raise NotAvailableError(f"RUN {run}: selects by {train['select_by']}; the context analysis compares excess losses")
    scope = train.get("select_scope", "sequence")
    if other and scope == "batch":
        raise NotAvailableError("--scores with a batch-scope run: its thresholds come from the step before the trace")
    dp = int((manifest.get("layout") or {}).get("dp", 1))
    group = train["micro_batch_size"] * dp
    run_source = ("online reference" if manifest.get("reference") else "sample store" if manifest.get("sample_scores")
                  else "document stores")
    parts: dict[str, list] = {"kept": [], "candidate": [], "ref": [], "loss": [], "other_kept": [], "other_ref": []}
    ratios, jaccard = [], []
    other_name = None
    for step in steps:
        t = read_trace(run, step)
        if "ref_loss" not in t:
            raise NotAvailableError(f"RUN {run}: its trace has no reference losses")
        ratio = ratio_at(step - 1, float(train["select_ratio"]), train.get("select_ratio_start"),
                         int(train.get("select_after") or 0), int(train["steps"]))
        ratios.append(ratio)
        candidate = t["loss_mask"] > 0
        parts["kept"].append(t["kept"].astype(bool))
        parts["candidate"].append(candidate)
        parts["ref"].append(t["ref_loss"])
        parts["loss"].append(t["loss"])
        if other:
            ref_other, other_name = other_values(run, manifest, list(other), t["samples"])
            kept_other = reselect(t["loss"], ref_other, candidate, ratio, scope, group) if ratio < 1.0 else candidate
            parts["other_kept"].append(kept_other)
            parts["other_ref"].append(ref_other)
            a, b = t["kept"].astype(bool), kept_other
            union = int((a | b).sum())
            jaccard.append(float((a & b).sum() / union) if union else 1.0)
    cat = {k: np.concatenate(v) for k, v in parts.items() if v}
    result = {"run": by_position(cat["kept"], cat["candidate"], cat["ref"], cat["loss"])}
    if other:
        result["other"] = by_position(cat["other_kept"], cat["candidate"], cat["other_ref"], cat["loss"])
    return ContextReport(run=str(run), steps=steps, ratio=ratios, scope=scope, source=run_source, by_position=result,
                         jaccard=jaccard, other=None if not other else f"{', '.join(other)} ({other_name})")


def write_report(report: ContextReport, output: Path | None, force: bool = False) -> Path | None:
    if output is None:
        return None
    import json

    from rhocli.core.errors import OutputExistsError

    if output.exists() and not force:
        raise OutputExistsError(f"--output {output}: exists; pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return output
