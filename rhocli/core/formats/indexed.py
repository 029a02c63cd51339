"""The structure of a megatron ``IndexedDataset`` store (``PREFIX.idx`` + ``PREFIX.bin``), checked
before megatron-core reads it: every rho store (tokens, scores, masks) is one.

megatron-core trusts the two files: a truncated ``.idx`` fails inside its reader (and its half-built
object then prints a traceback when collected), a short ``.bin`` becomes numpy's "buffer is smaller
than requested size", and a ``.bin`` from another store is read without complaint. ``read_index``
parses the header (docs/formats.md has the layout), and checks that the ``.idx`` is exactly as long
as its header says and the ``.bin`` exactly as long as its sequences: cheap (no data is read), and
each failure one line naming the file.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np

from rhocli.core.errors import BadInputError, MissingInputError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
#: megatron-core's dtype codes (indexed_dataset.DType)
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    dtype: np.dtype
    sequences: int
    documents: int
    #: elements in the .bin (tokens, scores, mask values)
    elements: int
    #: [documents] elements per document
    document_lengths: np.ndarray


def read_index(prefix: str | Path, label: str = "", what: str = "store") -> IndexInfo:
    idx_file, bin_file = Path(str(prefix) + ".idx"), Path(str(prefix) + ".bin")
    for path in (bin_file, idx_file):
        if not path.is_file():
            raise MissingInputError(f"{label}{path}: {what} file not found")
    size = idx_file.stat().st_size
    with open(idx_file, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != MAGIC:
        raise BadInputError(f"{label}{idx_file}: not a Megatron IndexedDataset index (bad header)")
    version, code, sequences, boundaries = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in DTYPES:
        raise BadInputError(f"{label}{idx_file}: unsupported IndexedDataset index (version {version}, dtype code {code})")
    expected = HEADER_BYTES + 4 * sequences + 8 * sequences + 8 * boundaries
    if size != expected:
        raise BadInputError(f"{label}{idx_file}: {size:,} bytes, but its header describes {expected:,} "
                            f"({sequences:,} sequences); the file is truncated or damaged")
    index = np.memmap(idx_file, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(index, dtype=np.int32, count=sequences, offset=HEADER_BYTES).astype(np.int64)
    doc_index = np.frombuffer(index, dtype=np.int64, count=boundaries, offset=HEADER_BYTES + 12 * sequences)
    if boundaries < 1 or doc_index[0] != 0 or doc_index[-1] != sequences or (np.diff(doc_index) < 0).any() or (lengths < 0).any():
        raise BadInputError(f"{label}{idx_file}: inconsistent IndexedDataset index (document boundaries)")
    dtype = np.dtype(DTYPES[code])
    elements = int(lengths.sum())
    bin_size = bin_file.stat().st_size
    if bin_size != elements * dtype.itemsize:
        raise BadInputError(f"{label}{bin_file}: {bin_size:,} bytes, but {idx_file.name} describes {elements:,} values "
                            f"of {dtype.name} ({elements * dtype.itemsize:,} bytes); the .bin is truncated or belongs "
                            "to another store")
    ends = np.concatenate([[0], np.cumsum(lengths)])
    document_lengths = ends[doc_index[1:]] - ends[doc_index[:-1]]
    del index
    return IndexInfo(dtype, int(sequences), int(boundaries - 1), elements, document_lengths)


def check_counts(info: IndexInfo, manifest: dict, prefix: str | Path, label: str = "", documents_key: str = "documents",
                 elements_key: str = "tokens") -> None:
    """The manifest's document and token counts are the index's (when the manifest has them)."""
    for key, actual in ((documents_key, info.documents), (elements_key, info.elements)):
        claimed = manifest.get(key)
        if claimed is not None and claimed != actual:
            raise BadInputError(f"{label}{prefix}.json: says {claimed:,} {key}, but {prefix}.idx holds {actual:,}; "
                                "the manifest belongs to another store")
