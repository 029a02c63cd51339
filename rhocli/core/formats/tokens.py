"""The token dataset: Megatron's ``IndexedDataset`` (``PREFIX.bin`` + ``PREFIX.idx``) plus rho's
``PREFIX.json`` manifest (format ``rho.tokens``). See docs/formats.md.

rho writes one sequence per document, so document ``i`` is sequence ``i``. Datasets written by
Megatron-LM's ``preprocess_data.py`` (no manifest, possibly several sentences per document) are read
too: a document is then the concatenation of its sequences.

The dataset fingerprint is the sha256 of the ``.idx`` bytes followed by the ``.bin`` bytes: it names
the content, whoever wrote it, and is what score stores and checkpoints refer to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from rhocli.core.errors import BadInputError
from rhocli.core.formats.manifest import ManifestType, content_fingerprint, store_fingerprint, store_paths

TOKENS = ManifestType("rho.tokens", 1, "token dataset")


def bin_path(prefix: str | Path) -> Path:
    return store_paths(prefix)[0]


def idx_path(prefix: str | Path) -> Path:
    return store_paths(prefix)[1]


def manifest_path(prefix: str | Path) -> Path:
    return store_paths(prefix)[2]


def optimal_token_dtype(vocab_size: int) -> str:
    """Megatron's rule (``DType.optimal_dtype``): uint16 below 65500 ids, int32 otherwise."""
    return "uint16" if vocab_size < 65500 else "int32"


def dataset_fingerprint(prefix: str | Path) -> str:
    return store_fingerprint(prefix)


def read_manifest(prefix: str | Path) -> dict[str, Any] | None:
    """The manifest as a dict, or None when the dataset has none (e.g. written by Megatron-LM)."""
    path = manifest_path(prefix)
    if not path.exists():
        return None
    return TOKENS.read(path)


class TokenDataset:
    """Read access to a token dataset through megatron-core's own ``IndexedDataset``."""

    def __init__(self, prefix: str | Path):
        from rhocli.core.formats.indexed import check_counts, read_index

        self.prefix = str(prefix)
        self.index_info = read_index(prefix, what="token dataset")  # the files' structure, before megatron reads them
        self.manifest = read_manifest(prefix)
        if self.manifest:
            check_counts(self.index_info, self.manifest, self.prefix)
        from rhocli.core.megatron_io import indexed_dataset

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
    def tokenizer(self) -> dict[str, Any]:
        """The manifest's tokenizer record ({} without a manifest)."""
        return (self.manifest or {}).get("tokenizer") or {}

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


class TokenDatasetWriter:
    """Writes a token dataset's ``.bin``/``.idx`` through megatron-core's ``IndexedDatasetBuilder``;
    the caller writes the manifest (``TOKENS.write``) with the fingerprint ``finalize`` returns.

    ``megatron`` returns ``megatron.core.datasets.indexed_dataset`` (default: imported now);
    ``ready`` says whether it can be had without waiting. ``rho tokenize`` passes a background import
    so the tokenization overlaps megatron-core's import: documents added before it is ready are held
    in memory and written once it is.
    """

    def __init__(self, bin_file: str | Path, dtype: str, megatron: Callable[[], Any] | None = None,
                 ready: Callable[[], bool] = lambda: True):
        if megatron is None:
            from rhocli.core.megatron_io import indexed_dataset as megatron
        self.bin_file = Path(bin_file)
        self.dtype = dtype
        self._megatron = megatron
        self._ready = ready
        self._builder = None
        self._pending: list[tuple[np.ndarray, list[int]]] = []

    def _start(self) -> None:
        self._builder = self._megatron().IndexedDatasetBuilder(str(self.bin_file), dtype=getattr(np, self.dtype))
        pending, self._pending = self._pending, []
        for tokens, lengths in pending:
            self._write(tokens, lengths)

    def _write(self, tokens: np.ndarray, lengths: list[int]) -> None:
        offset = 0
        for length in lengths:
            self._builder.add_document(tokens[offset:offset + length], [length])
            offset += length

    def add_documents(self, tokens: np.ndarray, lengths: list[int]) -> None:
        """Documents given as their concatenated ids ``tokens`` and their ``lengths``."""
        if self._builder is None and self._ready():
            self._start()
        if self._builder is None:
            self._pending.append((tokens, list(lengths)))
        else:
            self._write(tokens, list(lengths))

    def finalize(self, idx_file: str | Path) -> str:
        """Write the index; returns the dataset's fingerprint (for its manifest, ``TOKENS``)."""
        if self._builder is None:
            self._start()
        self._builder.finalize(str(idx_file))
        return content_fingerprint(idx_file, self.bin_file)


def write_subset(source: str | Path, prefix: str | Path, documents: int) -> dict[str, Any]:
    """The first ``documents`` documents of the token dataset ``source`` as a token dataset of its own
    at ``prefix`` (its manifest: the source's tokenizer, the new fingerprint and counts); returns that
    manifest. Used to score or analyse a fixed sample of a corpus."""
    ds = TokenDataset(source)
    n = min(documents, ds.num_documents)
    writer = TokenDatasetWriter(bin_path(prefix), ds.dtype.name)
    total = 0
    for i in range(n):
        doc = ds.document(i)
        writer.add_documents(doc, [len(doc)])
        total += len(doc)
    fields = {k: v for k, v in (ds.manifest or {}).items() if k not in ("format", "format_version")}
    fields.update(fingerprint=writer.finalize(idx_path(prefix)), documents=n, tokens=int(total),
                  subset_of={"prefix": str(source), "fingerprint": ds.fingerprint(), "documents": n})
    return TOKENS.write(manifest_path(prefix), fields)
