"""The mask store: which tokens to train on, with the same document boundaries as a token dataset.

``MASK.bin`` / ``MASK.idx``: a megatron ``IndexedDataset`` of uint8 0/1, one sequence per document;
``MASK.json``: the manifest (format ``rho.mask``, version 1) naming the token dataset it masks (by
fingerprint), the scores it came from and the selection rule. Written by ``rho select`` (and any
tool that wants ``rho train --mask``) and by ``rho tokenize`` for instruction data (``PREFIX.mask``:
the response tokens), read by ``rho train --mask``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rhocli.core.errors import MissingInputError
from rhocli.core.formats.manifest import ManifestType, content_fingerprint, store_paths
from rhocli.core.formats.staging import StagedOutput

MASKS = ManifestType("rho.mask", 1, "mask store")


def write_mask_store(output: str | Path, mask: np.ndarray, lengths: np.ndarray, fields: dict[str, Any],
                     force: bool = False) -> dict[str, Any]:
    """Publish ``mask`` [tokens] bool, split into documents of ``lengths``; the manifest is the store's
    fingerprint, then ``fields``. Returns the manifest."""
    outputs = list(store_paths(output))
    with StagedOutput(outputs, force=force) as stage, stage.staged_writes():
        manifest = write_mask_files([stage.path(p) for p in outputs], mask, lengths, fields)
        stage.commit()
    return manifest


def write_mask_files(paths: list[Path], mask: np.ndarray, lengths: np.ndarray, fields: dict[str, Any]) -> dict[str, Any]:
    """The store's three files at ``paths`` (.bin, .idx, .json: staged paths of the caller, which
    publishes them); returns the manifest."""
    from rhocli.core.megatron_io import indexed_dataset

    bin_file, idx_file, manifest_file = paths
    ends = np.concatenate([[0], np.cumsum(lengths)])
    builder = indexed_dataset().IndexedDatasetBuilder(str(bin_file), dtype=np.uint8)
    for d in range(lengths.size):
        builder.add_document(mask[ends[d]:ends[d + 1]].astype(np.uint8), [int(lengths[d])])
    builder.finalize(str(idx_file))
    return MASKS.write(manifest_file, {"fingerprint": content_fingerprint(idx_file, bin_file), **fields})


def read_mask_manifest(prefix: str | Path, label: str = "") -> dict[str, Any]:
    """The manifest, after checking the store's structure (``indexed.read_index``) and that it holds
    the documents and tokens its manifest says it masks."""
    from rhocli.core.formats.indexed import check_counts, read_index

    paths = store_paths(prefix)
    if not all(p.is_file() for p in paths):
        raise MissingInputError(f"{label}{prefix}: mask store not found (PREFIX.bin/.idx/.json from rho select)")
    manifest = MASKS.read(paths[2], label)
    info = read_index(prefix, label, "mask store")
    check_counts(info, {"documents": (manifest.get("token_dataset") or {}).get("documents"),
                        "tokens": manifest.get("tokens")}, prefix, label)
    return manifest


def read_masks(prefix: str | Path) -> list[np.ndarray]:
    """Every document's mask as bool [document_length]."""
    from rhocli.core.megatron_io import indexed_dataset

    read_mask_manifest(prefix)
    ds = indexed_dataset().IndexedDataset(str(prefix), mmap=True)
    return [np.asarray(ds[i]).astype(bool) for i in range(len(ds))]
