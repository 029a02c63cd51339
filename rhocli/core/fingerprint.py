"""Content fingerprints: ``sha256:`` + the SHA-256 of files' bytes, read in chunks (the one loop)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

CHUNK_BYTES = 1 << 22


def sha256_files(paths: Iterable[str | Path], with_names: bool = False) -> str:
    """``sha256:`` of the files' bytes in order; ``with_names`` also hashes each file's name (and a
    NUL) before its bytes, so renaming a file changes the fingerprint."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        if with_names:
            digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    return sha256_files([path])
