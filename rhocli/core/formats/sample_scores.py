"""The sample score store: reference losses of a training run's own samples, with their exact context.

A document score store (``scores.py``) holds one value per token of a token dataset, each scored
inside its own document. A sample store holds one row per **training sample** of a data pipeline:
``PREFIX.bin`` is float32 ``[samples, seq_length]``, row ``g`` the reference model's loss for each
label of global sample ``g`` (position ``t`` predicts token ``t + 1`` of the sample), predicted from
exactly the context the trained model sees there: the sample's own earlier tokens, the previous
document's included under stream packing, or only its document's with ``--separate-documents``.
``PREFIX.json`` (format ``rho.sample_scores``, version 1) records the pipeline the rows belong to
(``pipeline_record``: the datasets by content, weights, split, sequence length, seed, number of
samples, packing); ``rho train --scores`` reads such a store only for a run with that pipeline
(``first_difference`` names what differs). ``SCORES.entropy`` beside it holds the reference's
entropy, as for document stores (``scores.entropy_prefix``).

``SampleScoreWriter`` is where ``rho score --for-run`` writes: a preallocated ``values.bin`` in
``PREFIX.rho-work/``, rows written in place by the rank that holds them, each data-parallel rank's
last finished step recorded (a killed run resumes after the last step every rank finished), then
``publish``: statistics and the fingerprint streamed in blocks (memory independent of the store's
size), manifest written, files moved into place, manifest last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rhocli.core.errors import BadInputError
from rhocli.core.formats.manifest import ManifestType

SAMPLE_SCORES = ManifestType("rho.sample_scores", 1, "sample score store")
#: rows read at a time when a whole store is streamed (statistics, fingerprint, verify)
BLOCK_ROWS = 4096
LOSS_VALUE = "reference model's cross-entropy (nats) for each label of each training sample, in the sample's context"
ENTROPY_VALUE = "reference model's entropy of its next-token distribution (nats) at each label of each training sample"


def paths(prefix: str | Path) -> tuple[Path, Path]:
    """(.bin, .json) of a sample store."""
    return Path(f"{prefix}.bin"), Path(f"{prefix}.json")


def is_sample_store(prefix: str | Path) -> bool:
    """Whether PREFIX.json is a sample store's manifest (else: a document store, or nothing)."""
    try:
        return json.loads(paths(prefix)[1].read_text()).get("format") == SAMPLE_SCORES.format
    except (OSError, ValueError, AttributeError):
        return False


def pipeline_record(train: dict[str, Any], datasets: list[tuple[str, float | None]], eod_id: int) -> dict[str, Any]:
    """What fixes a run's training samples, from its train configuration as a dict (a TrainConfig's
    ``config_to_dict``, or a checkpoint manifest's ``config.train``) and its datasets (fingerprint,
    weight), in the order a difference is reported: the datasets, the document split (None: every
    document, validation on data of its own), the sequence length, the data seed, the number of
    samples (megatron's GPTDataset shuffles over as many epochs as it needs), the packing and the
    end-of-document id."""
    return {
        "datasets": [{"fingerprint": fp, "weight": w} for fp, w in datasets],
        "split": None if train.get("eval_data") else train["split"],
        "seq_length": int(train["seq_length"]),
        "seed": int(train["seed"]),
        "samples": int(train["steps"]) * int(train["global_batch_size"]),
        "separate_documents": bool(train.get("separate_documents", False)),
        "pack": train.get("pack", "stream"),
        "eod_id": int(eod_id),
    }


#: how a difference is named: the option that sets each pipeline field
PIPELINE_NAMES = {"datasets": "--data (datasets by content, and weights)", "split": "train.split (or --eval-data)",
                  "seq_length": "--seq-length", "seed": "--seed", "samples": "--steps x --global-batch-size",
                  "separate_documents": "--separate-documents", "pack": "--pack", "eod_id": "the end-of-document id"}


def first_difference(recorded: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """The first pipeline field that differs, worded 'NAME: store X, run Y'; None when equal."""
    for key in PIPELINE_NAMES:
        if recorded.get(key) != mine.get(key):
            return f"{PIPELINE_NAMES[key]}: store {recorded.get(key)!r}, this run {mine.get(key)!r}"
    return None


@dataclasses.dataclass
class SampleScores:
    """A finished sample store: manifest and values, a read-only memmap [samples, seq_length]."""

    prefix: str
    manifest: dict[str, Any]
    values: np.ndarray


def read_sample_manifest(prefix: str | Path, label: str = "") -> dict[str, Any]:
    """The manifest, after checking the .bin holds exactly the rows it says."""
    bin_file, json_file = paths(prefix)
    manifest = SAMPLE_SCORES.read(json_file, label)
    try:
        samples, seq = int(manifest["samples"]), int(manifest["seq_length"])
    except (KeyError, TypeError, ValueError):
        raise BadInputError(f"{label}{json_file}: no samples / seq_length in the manifest") from None
    if not bin_file.is_file():
        raise BadInputError(f"{label}{bin_file}: missing (the manifest says {samples:,} samples)")
    size = bin_file.stat().st_size
    if size != samples * seq * 4:
        raise BadInputError(f"{label}{bin_file}: {size:,} bytes, but {samples:,} samples x {seq} float32 values are "
                            f"{samples * seq * 4:,}; the store is damaged")
    return manifest


def open_sample_scores(prefix: str | Path, label: str = "") -> SampleScores:
    manifest = read_sample_manifest(prefix, label)
    values = np.memmap(paths(prefix)[0], dtype=np.float32, mode="r",
                       shape=(int(manifest["samples"]), int(manifest["seq_length"])))
    return SampleScores(str(prefix), manifest, values)


def stream_statistics(values: np.ndarray) -> dict[str, Any]:
    """Mean, std (Welford's merge of block moments), min, max and the count of finite values, over
    blocks of ``BLOCK_ROWS`` rows: memory independent of the store's size."""
    n, mean, m2 = 0, 0.0, 0.0
    low, high = float("inf"), float("-inf")
    for r in range(0, values.shape[0], BLOCK_ROWS):
        block = np.asarray(values[r:r + BLOCK_ROWS], dtype=np.float64).reshape(-1)
        block = block[np.isfinite(block)]
        if not block.size:
            continue
        bn, bmean = block.size, float(block.mean())
        bm2 = float(((block - bmean) ** 2).sum())
        delta = bmean - mean
        total = n + bn
        mean += delta * bn / total
        m2 += bm2 + delta * delta * n * bn / total
        n = total
        low, high = min(low, float(block.min())), max(high, float(block.max()))
    return {"values": n, "mean": mean if n else None, "std": (m2 / n) ** 0.5 if n else None,
            "min": low if n else None, "max": high if n else None}


class SampleScoreWriter:
    """Where ``rho score --for-run`` writes: rows in place in ``OUTPUT.rho-work/values.bin``.

    Rank 0 calls ``prepare`` first and ``publish`` last; the ranks that hold values call ``write``;
    every writer calls ``step_done`` after each step (its DP rank's progress)."""

    def __init__(self, output: str | Path, manifest_fields: dict[str, Any] | None = None,
                 settings: dict[str, Any] | None = None, value: str = LOSS_VALUE):
        self.output = str(output)
        self.work = Path(self.output + ".rho-work")
        self.manifest_fields = dict(manifest_fields or {})
        #: what the values depend on (model, pipeline, layout): a resumed run must match them
        self.settings = dict(settings or {})
        self.value = value
        self._values: np.ndarray | None = None

    @property
    def final_paths(self) -> tuple[Path, Path]:
        return paths(self.output)

    @property
    def _bin(self) -> Path:
        return self.work / "values.bin"

    def check_resume(self, names: dict[str, str]) -> None:
        """Before resuming: the unfinished run's settings are this run's."""
        from rhocli.core.formats.scores import recorded_work_settings, refuse_other_settings

        refuse_other_settings(self.work, recorded_work_settings(self.work), self.settings, names)

    def prepare(self, samples: int, seq_length: int) -> None:
        """Rank 0, before any value: the work folder, its settings and the values file at full size
        (a sparse file: no block is written until a row is)."""
        from rhocli.core.formats.scores import write_work_settings

        write_work_settings(self.work, self.settings)
        size = samples * seq_length * 4
        if not self._bin.exists() or self._bin.stat().st_size != size:
            with open(self._bin, "wb") as f:
                f.truncate(size)
        self.manifest_fields.update(samples=int(samples), seq_length=int(seq_length))

    def first_step(self, dp: int) -> int:
        """The step a resumed run starts at: after the last one every DP rank finished (0: none)."""
        done = []
        for d in range(dp):
            try:
                done.append(int((self.work / f"progress.dp{d}").read_text()))
            except (OSError, ValueError):
                return 0
        return min(done) + 1

    def _open(self, samples: int, seq_length: int) -> np.ndarray:
        if self._values is None:
            self._values = np.memmap(self._bin, dtype=np.float32, mode="r+", shape=(samples, seq_length))
        return self._values

    def write(self, samples: list[int], rows: np.ndarray, shape: tuple[int, int]) -> None:
        """Rows [b, seq_length] of consecutive global samples ``samples``."""
        values = self._open(*shape)
        values[samples[0]:samples[-1] + 1] = rows

    def step_done(self, step: int, dp_rank: int) -> None:
        """This DP rank's rows up to ``step`` are on disk."""
        if self._values is not None:
            self._values.flush()
        marker = self.work / f"progress.dp{dp_rank}"
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(str(step))
        os.replace(tmp, marker)

    def publish(self) -> dict[str, Any]:
        """Statistics and fingerprint streamed over the values, the manifest, the files moved into
        place (manifest last: it marks a complete store), the work folder removed."""
        from rhocli.core.fingerprint import sha256_files

        samples, seq = int(self.manifest_fields["samples"]), int(self.manifest_fields["seq_length"])
        values = np.memmap(self._bin, dtype=np.float32, mode="r", shape=(samples, seq))
        statistics = stream_statistics(values)
        del values
        staged = self.work / "final.json"
        manifest = SAMPLE_SCORES.write(staged, {
            "fingerprint": sha256_files([self._bin]),
            "dtype": "float32",
            "value": self.value,
            **self.manifest_fields,
            "statistics": statistics,
        })
        bin_file, json_file = self.final_paths
        os.replace(self._bin, bin_file)
        os.replace(staged, json_file)
        shutil.rmtree(self.work, ignore_errors=True)
        return {"output": self.output, "samples": samples, "seq_length": seq, "tokens": samples * seq,
                "mean": manifest["statistics"]["mean"]}

    def clear_work(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def check_sample_fingerprint(prefix: str | Path, manifest: dict[str, Any], label: str = "") -> None:
    """The .bin still hashes to the manifest's fingerprint (reads every byte once)."""
    from rhocli.core.fingerprint import sha256_files

    content = sha256_files([paths(prefix)[0]])
    if content != manifest.get("fingerprint"):
        raise BadInputError(f"{label}{prefix}.bin: content fingerprint {content[:19]}… differs from its manifest's "
                            f"{str(manifest.get('fingerprint'))[:19]}…; the file was changed after it was written")


def verify_sample_store(prefix: str | Path) -> tuple[dict[str, Any], int]:
    """Every value finite and the content fingerprint the manifest's (reads every byte once, in
    blocks); returns (manifest, values checked). Raises BadInputError naming the first problem."""
    store = open_sample_scores(prefix)
    for r in range(0, store.values.shape[0], BLOCK_ROWS):
        block = np.asarray(store.values[r:r + BLOCK_ROWS])
        bad = ~np.isfinite(block)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise BadInputError(f"{prefix}.bin: a non-finite value at sample {r + int(row):,}, position {int(col)}; "
                                f"the store is damaged (score it again)")
    check_sample_fingerprint(prefix, store.manifest)
    return store.manifest, int(store.values.size)
