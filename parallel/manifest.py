"""Reading rho's versioned JSON manifests (checkpoints, score stores, token datasets, masks)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def read_versioned_json(path: Path, fmt: str, version: int, error: type[Exception], what: str) -> dict[str, Any]:
    """The manifest at ``path``; raises ``error`` with one line when it is unreadable, of another
    format, or of a newer version than this rho understands."""
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise error(f"{path}: unreadable {what} manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise error(f"{path}: not a rho {what} manifest (format={found!r}, expected {fmt!r})")
    found_version = manifest.get("format_version")
    if not isinstance(found_version, int) or found_version > version:
        raise error(f"{path}: {what} format version {found_version} is newer than this rho understands ({version}); upgrade rho")
    return manifest


def store_fingerprint(prefix: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Content fingerprint of an IndexedDataset store (tokens, scores, masks): ``sha256:`` of the
    ``.idx`` bytes followed by the ``.bin`` bytes, read in chunks."""
    digest = hashlib.sha256()
    for ext in (".idx", ".bin"):
        with open(str(prefix) + ext, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
