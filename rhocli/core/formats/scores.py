"""The score store: per-token reference losses with the same document boundaries as a token dataset.

``SCORES.bin`` / ``SCORES.idx`` are a megatron ``IndexedDataset`` of float32, one sequence per
document, each as long as the token document it scores; ``SCORES.json`` is the manifest (format
``rho.scores``, version 1). Value ``i`` of document ``d`` is the reference model's loss for predicting
token ``i`` of ``d``; the first token is predicted from the end-of-document id alone. How documents
longer than the context are scored is the engine's (``parallel.windows``); docs/score.md.

``ScoreStoreWriter`` is the sink ``rho score``'s ranks write through: finished shards go to
``SCORES.rho-work/`` (each marked done, so a killed run resumes), and ``publish`` concatenates them
in order and moves the store into place, manifest last. ``open_scores`` reads a finished store.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rhocli.core.errors import BadInputError, MismatchError
from rhocli.core.formats.manifest import ManifestType, content_fingerprint, store_fingerprint, store_paths

SCORES = ManifestType("rho.scores", 1, "score store")
#: histogram of the published values: HISTOGRAM_BINS bins over [0, HISTOGRAM_MAX) nats
HISTOGRAM_BINS = 40
HISTOGRAM_MAX = 20.0


#: the manifest's ``value`` of an entropy store
ENTROPY_VALUE = "reference model's entropy of its next-token distribution (nats) at each token's position"


def entropy_prefix(scores_prefix: str | Path) -> str:
    """Where ``rho score --entropy`` writes the reference model's entropy per token, beside the losses
    in SCORES: a score store of its own (same format, same documents), ``SCORES.entropy``."""
    return f"{scores_prefix}.entropy"


@dataclasses.dataclass
class ScoreStore:
    """A finished score store: its manifest, document lengths [documents] and values [tokens]."""

    prefix: str
    manifest: dict[str, Any]
    lengths: np.ndarray
    values: np.ndarray

    def documents(self) -> list[np.ndarray]:
        """The values split per document."""
        ends = np.cumsum(self.lengths)[:-1]
        return np.split(self.values, ends) if self.lengths.size else []


def read_scores_manifest(prefix: str | Path, label: str = "") -> dict[str, Any]:
    """The manifest, after checking the store's structure (``indexed.read_index``) and that it holds
    the documents and tokens its manifest says it scores."""
    from rhocli.core.formats.indexed import check_counts, read_index

    manifest = SCORES.read(store_paths(prefix)[2], label)
    info = read_index(prefix, label, "score store")
    check_counts(info, manifest.get("token_dataset") or {}, prefix, label)
    return manifest


def open_scores(prefix: str | Path, label: str = "") -> ScoreStore:
    """Read a whole score store (values as float32). Every value of a store rho score wrote is a
    finite loss: a NaN or infinity means the file was damaged, and is refused with its place."""
    from rhocli.core.megatron_io import indexed_dataset

    manifest = read_scores_manifest(prefix, label)
    ds = indexed_dataset().IndexedDataset(str(prefix), mmap=True)
    lengths = np.array(ds.sequence_lengths, dtype=np.int64)
    del ds
    bin_file = store_paths(prefix)[0]
    values = np.fromfile(bin_file, dtype=np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.argmax(bad))
        doc = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
        start = int(lengths[:doc].sum())
        raise BadInputError(f"{label}{bin_file}: {int(bad.sum()):,} non-finite score(s), the first at document {doc}, "
                            f"token {first - start}; the store is damaged (rho verify {prefix}; score it again)")
    return ScoreStore(str(prefix), manifest, lengths, values)


#: the settings an unfinished scoring run was started with, in its work folder (``--resume`` compares)
WORK_SETTINGS_NAME = "settings.json"


def write_work_settings(work: Path, settings: dict[str, Any]) -> None:
    """The work folder, with the settings of the run that starts it (kept by a resumed run)."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / WORK_SETTINGS_NAME
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        os.replace(tmp, path)


def recorded_work_settings(work: Path) -> dict[str, Any]:
    """The settings an unfinished run recorded; MismatchError when there is no readable record."""
    path = work / WORK_SETTINGS_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise MismatchError(f"{work}: no record of the settings this unfinished run used ({path}); "
                            "pass --force to start over") from None


def refuse_other_settings(work: Path, recorded: dict[str, Any], settings: dict[str, Any], names: dict[str, str]) -> None:
    """A resume continues only with the settings the values were made with; ``names`` words each one."""
    detail = "; ".join(f"{names.get(k, k)} was {recorded.get(k)!r}, now {settings[k]!r}"
                       for k in settings if recorded.get(k) != settings[k])
    if detail:
        raise MismatchError(f"{work}: cannot resume with other settings ({detail}); "
                            "resume with the original ones, or pass --force to start over")


class ScoreStoreWriter:
    """Where ``rho score`` writes: shards in ``OUTPUT.rho-work/``, then the published store.

    Every rank may ask ``is_done``; the rank that holds a shard's losses calls ``write_shard``; rank
    0 calls ``prepare`` first and ``publish`` last.
    """

    def __init__(self, output: str | Path, manifest_fields: dict[str, Any] | None = None,
                 settings: dict[str, Any] | None = None):
        self.output = str(output)
        self.work = Path(self.output + ".rho-work")
        #: fields of the manifest known before scoring (window, token dataset, reference model, ...)
        self.manifest_fields = dict(manifest_fields or {})
        #: what a score's value depends on (model, tokens, window, ...): a resumed run must match them
        self.settings = dict(settings or {})

    def check_resume(self, names: dict[str, str]) -> None:
        """Before resuming: every finished shard is still what was written (one that is not is scored
        again), and the unfinished run's settings are this run's, or its shards and the new ones would
        be two different stores in one. ``names`` says how to call each setting."""
        recorded = recorded_work_settings(self.work)
        for marker in sorted(self.work.glob("shard_*.done")):  # a damaged shard is scored again
            try:
                intact = json.loads(marker.read_text())["fingerprint"] == store_fingerprint(marker.with_suffix(""))
            except (OSError, ValueError, KeyError, TypeError):
                intact = False
            if not intact:
                marker.unlink()
        refuse_other_settings(self.work, recorded, self.settings, names)

    @property
    def final_paths(self) -> tuple[Path, Path, Path]:
        return store_paths(self.output)

    def _shard(self, shard: int) -> Path:
        return self.work / f"shard_{shard:06d}"

    def prepare(self) -> None:
        """Rank 0, before any shard: the work folder, with the settings of the run that starts it."""
        write_work_settings(self.work, self.settings)

    def is_done(self, shard: int) -> bool:
        return self._shard(shard).with_suffix(".done").exists()

    def write_shard(self, shard: int, values: dict[int, np.ndarray]) -> None:
        """One shard's documents {document index: float32 values}, written then marked done."""
        from rhocli.core.megatron_io import indexed_dataset

        tmp = self.work / f".shard_{shard:06d}.tmp"
        builder = indexed_dataset().IndexedDatasetBuilder(str(tmp) + ".bin", dtype=np.float32)
        for d in sorted(values):
            builder.add_document(values[d], [len(values[d])])
        builder.finalize(str(tmp) + ".idx")
        final = self._shard(shard)
        os.replace(str(tmp) + ".bin", str(final) + ".bin")
        os.replace(str(tmp) + ".idx", str(final) + ".idx")
        # the marker holds the shard's fingerprint: a resume checks the shard is still what was written
        final.with_suffix(".done").write_text(json.dumps({"fingerprint": store_fingerprint(final)}) + "\n")

    def publish(self, n_shards: int, token_lengths: np.ndarray) -> dict[str, Any]:
        """Concatenate the shards in order (megatron's ``add_index``), write the manifest, move the
        store into place (manifest last: it marks a complete store) and remove the work folder."""
        from rhocli.core.megatron_io import indexed_dataset

        module = indexed_dataset()
        staging = self.work / "final"
        builder = module.IndexedDatasetBuilder(str(staging) + ".bin", dtype=np.float32)
        for s in range(n_shards):
            builder.add_index(str(self._shard(s)))
        builder.finalize(str(staging) + ".idx")
        published = module.IndexedDataset(str(staging), mmap=True)
        lengths = np.array(published.sequence_lengths)  # a copy: the index is unmapped with its dataset
        del published
        if not np.array_equal(lengths, np.asarray(token_lengths)):
            raise RuntimeError("score store and token dataset disagree on document lengths")  # invariant
        values = np.memmap(str(staging) + ".bin", dtype=np.float32, mode="r")
        hist, edges = np.histogram(values[np.isfinite(values)], bins=HISTOGRAM_BINS, range=(0.0, HISTOGRAM_MAX))
        fields = dict(self.manifest_fields)
        token_dataset = {**fields.pop("token_dataset", {}), "documents": int(len(lengths)), "tokens": int(lengths.sum())}
        window = fields.pop("window", None)
        manifest = SCORES.write(str(staging) + ".json", {
            "fingerprint": content_fingerprint(str(staging) + ".idx", str(staging) + ".bin"),
            "dtype": "float32",
            "value": "reference model's cross-entropy (nats) for predicting each token",
            "first_token": "predicted from the end-of-document id alone",
            "window": window,
            "token_dataset": token_dataset,
            "statistics": {
                "mean": float(values.mean()) if values.size else None,
                "std": float(values.std()) if values.size else None,
                "min": float(values.min()) if values.size else None,
                "max": float(values.max()) if values.size else None,
                "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in hist]},
            },
            **fields,
        })
        for ext, final in zip((".bin", ".idx", ".json"), self.final_paths):
            os.replace(str(staging) + ext, final)
        shutil.rmtree(self.work, ignore_errors=True)
        return {"output": self.output, "documents": int(len(lengths)), "tokens": int(lengths.sum()),
                "mean": manifest["statistics"]["mean"]}

    def clear_work(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
