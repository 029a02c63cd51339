"""The token dataset: Megatron's ``IndexedDataset`` (``PREFIX.bin`` + ``PREFIX.idx``) plus rho's
``PREFIX.json`` manifest. See docs/formats.md.

rho writes one sequence per document, so document ``i`` is sequence ``i``. Datasets written by
Megatron-LM's ``preprocess_data.py`` (no manifest, possibly several sentences per document) are read
too: a document is then the concatenation of its sequences.

The dataset fingerprint is the sha256 of the ``.idx`` bytes followed by the ``.bin`` bytes: it names
the content, whoever wrote it, and is what score stores and checkpoints refer to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rhocli.errors import BadInputError, MissingInputError

TOKENS_FORMAT = "rho.tokens"
TOKENS_FORMAT_VERSION = 1


def bin_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + ".bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + ".idx")


def manifest_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + ".json")


def optimal_token_dtype(vocab_size: int) -> str:
    """Megatron's rule (``DType.optimal_dtype``): uint16 below 65500 ids, int32 otherwise."""
    return "uint16" if vocab_size < 65500 else "int32"


def dataset_fingerprint(prefix: str | Path) -> str:
    from parallel.manifest import store_fingerprint

    return store_fingerprint(prefix)


def read_manifest(prefix: str | Path) -> dict[str, Any] | None:
    """The manifest as a dict, or None when the dataset has none (e.g. written by Megatron-LM)."""
    from parallel.manifest import read_versioned_json

    path = manifest_path(prefix)
    if not path.exists():
        return None
    return read_versioned_json(path, TOKENS_FORMAT, TOKENS_FORMAT_VERSION, BadInputError, "token dataset")


class TokenDataset:
    """Read access to a token dataset through megatron-core's own ``IndexedDataset``."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        for path in (bin_path(prefix), idx_path(prefix)):
            if not path.exists():
                raise MissingInputError(f"{path}: token dataset file not found")
        self.manifest = read_manifest(prefix)
        from rhocli.megatron_io import indexed_dataset

        try:
            self._ds = indexed_dataset().IndexedDataset(self.prefix, mmap=True)
        except Exception as err:  # megatron asserts on a bad header / sizes
            raise BadInputError(f"{idx_path(prefix)}: not a readable Megatron IndexedDataset ({err})") from err
        self._doc_index = np.asarray(self._ds.document_indices)

    @property
    def num_documents(self) -> int:
        return len(self._doc_index) - 1

    @property
    def num_tokens(self) -> int:
        return int(np.asarray(self._ds.sequence_lengths, dtype=np.int64).sum())

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._ds.index.dtype)

    @property
    def indexed_dataset(self):
        """The underlying ``megatron.core.datasets.indexed_dataset.IndexedDataset``."""
        return self._ds

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i``: [document_length]."""
        first, last = int(self._doc_index[i]), int(self._doc_index[i + 1])
        if last - first == 1:
            return self._ds[first]
        if last == first:
            return np.zeros(0, dtype=self.dtype)
        return np.concatenate([self._ds[j] for j in range(first, last)])

    def document_lengths(self) -> np.ndarray:
        """[num_documents] token count of each document."""
        seq_lengths = np.asarray(self._ds.sequence_lengths, dtype=np.int64)
        ends = np.concatenate([[0], np.cumsum(seq_lengths)])
        return ends[self._doc_index[1:]] - ends[self._doc_index[:-1]]

    def fingerprint(self) -> str:
        """The manifest's fingerprint when present (verified lazily by consumers), else computed."""
        if self.manifest and isinstance(self.manifest.get("fingerprint"), str):
            return self.manifest["fingerprint"]
        return dataset_fingerprint(self.prefix)
