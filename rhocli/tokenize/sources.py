"""Input files for ``rho tokenize``: finding them and cutting them into jobs for the workers.

The main process only reads bytes and cuts them into jobs (a few hundred KiB each); decoding,
JSON parsing and tokenization happen in the workers (``rhocli.tokenize.worker``). Jobs are produced
in file order, so the output does not depend on the number of workers.

Supported inputs (see docs/tokenize.md):

* ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` one JSON object per line, text under ``--json-key``;
* ``.txt`` one document per file, or one per line with ``--txt-mode line``;
* ``.parquet`` the ``--json-key`` column(s).

Blank lines in ``.jsonl`` and line-mode ``.txt`` separate nothing and are ignored (counted).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Iterator, Literal

from rhocli.core.errors import BadInputError, MissingInputError, UsageError

SourceKind = Literal["jsonl", "txt", "parquet"]

#: file name ending -> (kind, compression)
EXTENSIONS: dict[str, tuple[SourceKind, str | None]] = {
    ".jsonl": ("jsonl", None),
    ".jsonl.gz": ("jsonl", "gz"),
    ".jsonl.zst": ("jsonl", "zst"),
    ".txt": ("txt", None),
    ".parquet": ("parquet", None),
}

#: a job is cut when its raw bytes reach this size (or JOB_MAX_ITEMS items)
JOB_BYTES = 1048576
JOB_MAX_ITEMS = 2048


@dataclasses.dataclass(frozen=True)
class Source:
    path: Path
    kind: SourceKind
    compression: str | None
    size: int


@dataclasses.dataclass
class Job:
    """One unit of work for a worker. ``items`` are raw line/document bytes (jsonl, txt) or tuples of
    column values (parquet); ``linenos`` give each item's 1-based line (or row) for error messages."""

    kind: SourceKind
    linenos: list[int]
    items: list[Any]


@dataclasses.dataclass
class ReadState:
    """Progress of reading one source, updated by ``iter_jobs`` as it goes."""

    bytes_read: int = 0
    blank_lines: int = 0
    sha256: str | None = None


def _kind_of(path: Path) -> tuple[SourceKind, str | None] | None:
    name = path.name.lower()
    for ending in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ending):
            return EXTENSIONS[ending]
    return None


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def expand_inputs(patterns: list[str] | tuple[str, ...]) -> list[Source]:
    """Files named by ``patterns`` (paths or globs), in the given order, globs sorted."""
    if not patterns:
        raise UsageError("no INPUT given: name at least one .jsonl/.jsonl.gz/.jsonl.zst/.txt/.parquet file")
    sources: list[Source] = []
    for pattern in patterns:
        if _is_glob(pattern):
            paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if not Path(p).is_dir()]
            if not paths:
                raise MissingInputError(f"{pattern}: no files match")
        else:
            paths = [Path(pattern)]
        for path in paths:
            if not path.exists():
                raise MissingInputError(f"{path}: input file not found")
            if path.is_dir():
                raise UsageError(f"{path}: is a directory; pass its files or a glob such as '{path}/*.jsonl'")
            kind = _kind_of(path)
            if kind is None:
                known = ", ".join(EXTENSIONS)
                raise BadInputError(f"{path}: unknown input type (expected one of {known})")
            if not os.access(path, os.R_OK):
                raise MissingInputError(f"{path}: input file is not readable")
            sources.append(Source(path=path, kind=kind[0], compression=kind[1], size=path.stat().st_size))
    return sources


class _HashingReader(io.RawIOBase):
    """Raw file proxy that hashes and counts every byte read, so a source is read exactly once."""

    def __init__(self, raw: io.BufferedReader, state: ReadState):
        self._raw = raw
        self._digest = hashlib.sha256()
        self._state = state

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        if n:
            self._digest.update(memoryview(buffer)[:n])
            self._state.bytes_read += n
        return n

    def hexdigest(self) -> str:
        return "sha256:" + self._digest.hexdigest()


def _open_stream(source: Source, raw: _HashingReader) -> io.BufferedIOBase:
    if source.compression == "gz":
        return gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20), mode="rb")
    if source.compression == "zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20)
    return io.BufferedReader(raw, 1 << 20)


def _drain(raw: _HashingReader) -> None:
    """Read what the decoder left unread (trailing bytes) so the hash covers the whole file."""
    while raw.read(1 << 20):
        pass


def iter_jobs(source: Source, json_keys: tuple[str, ...], txt_mode: str, state: ReadState) -> Iterator[Job]:
    """Cut ``source`` into jobs, updating ``state`` (bytes read, blank lines, final sha256)."""
    if source.kind == "parquet":
        yield from _iter_parquet_jobs(source, json_keys, state)
        return
    try:
        with open(source.path, "rb") as f:
            raw = _HashingReader(f, state)
            stream = _open_stream(source, raw)
            if source.kind == "txt" and txt_mode == "document":
                yield Job("txt", [1], [stream.read()])
            else:
                yield from _iter_line_jobs(source.kind, stream, state)
            _drain(raw)
            state.sha256 = raw.hexdigest()
    except (EOFError, gzip.BadGzipFile, OSError) as err:
        raise BadInputError(f"{source.path}: cannot read ({_describe(err)}); is the file truncated or corrupt?") from err
    except Exception as err:
        if type(err).__module__.startswith("zstandard") or type(err).__name__ == "ZstdError":
            raise BadInputError(f"{source.path}: cannot decompress ({_describe(err)}); is the file truncated or corrupt?") from err
        raise


def _iter_line_jobs(kind: SourceKind, stream: io.BufferedIOBase, state: ReadState) -> Iterator[Job]:
    linenos: list[int] = []
    items: list[bytes] = []
    job_bytes = 0
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            state.blank_lines += 1
            continue
        if kind == "txt":
            line = line.rstrip(b"\r\n")
        linenos.append(lineno)
        items.append(line)
        job_bytes += len(line)
        if job_bytes >= JOB_BYTES or len(items) >= JOB_MAX_ITEMS:
            yield Job(kind, linenos, items)
            linenos, items, job_bytes = [], [], 0
    if items:
        yield Job(kind, linenos, items)


def _iter_parquet_jobs(source: Source, json_keys: tuple[str, ...], state: ReadState) -> Iterator[Job]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as err:
        raise BadInputError(f"{source.path}: not a readable parquet file ({_describe(err)})") from err
    columns = pf.schema_arrow.names
    for key in json_keys:
        if key not in columns:
            raise BadInputError(f"{source.path}: no column '{key}' (columns: {', '.join(columns)}); choose one with --json-key")
    total_rows = max(pf.metadata.num_rows, 1)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=list(json_keys)):
            values = [batch.column(key).to_pylist() for key in json_keys]
            n = batch.num_rows
            yield Job("parquet", list(range(row + 1, row + n + 1)), list(zip(*values)))
            row += n
            state.bytes_read = int(source.size * row / total_rows)
    except (pa.ArrowException, OSError) as err:
        raise BadInputError(f"{source.path}: cannot read parquet ({_describe(err)})") from err
    state.bytes_read = source.size
    from rhocli.core.fingerprint import file_sha256

    state.sha256 = file_sha256(source.path)


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
