"""rho's versioned JSON manifests: one type for every format (tokens, scores, masks, checkpoints).

A manifest is a JSON object with ``format`` (e.g. ``"rho.scores"``) and ``format_version`` first,
then the format's own fields. Readers refuse another format and versions newer than this rho
understands, with one line naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rhocli.core.errors import BadInputError, MissingInputError


@dataclasses.dataclass(frozen=True)
class ManifestType:
    format: str
    version: int
    #: how messages name it: "score store", "checkpoint", ...
    what: str

    def document(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The manifest's content: format and version first, then ``fields``."""
        return {"format": self.format, "format_version": self.version, **fields}

    def write(self, path: str | Path, fields: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest (indented JSON, one trailing newline); returns its content."""
        doc = self.document(fields)
        Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        return doc

    def read(self, path: str | Path, label: str = "") -> dict[str, Any]:
        """The manifest at ``path``. ``label`` (e.g. ``"--scores "``) prefixes every message."""
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"{label}{path}: {self.what} manifest not found")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise BadInputError(f"{label}{path}: unreadable {self.what} manifest ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != self.format:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise BadInputError(f"{label}{path}: not a rho {self.what} manifest (format={found!r}, expected {self.format!r})")
        found_version = manifest.get("format_version")
        if not isinstance(found_version, int) or found_version > self.version:
            raise BadInputError(f"{label}{path}: {self.what} format version {found_version} is newer than this rho "
                                f"understands ({self.version}); upgrade rho")
        return manifest


def store_paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    """(.bin, .idx, .json) of an IndexedDataset store with a manifest (tokens, scores, masks)."""
    p = str(prefix)
    return Path(p + ".bin"), Path(p + ".idx"), Path(p + ".json")


def store_fingerprint(prefix: str | Path) -> str:
    """Content fingerprint of an IndexedDataset store: ``sha256:`` of the ``.idx`` bytes followed by
    the ``.bin`` bytes. It names the content whoever wrote it; stores refer to each other by it."""
    bin_file, idx_file, _ = store_paths(prefix)
    return content_fingerprint(idx_file, bin_file)


def content_fingerprint(idx_file: str | Path, bin_file: str | Path) -> str:
    """``store_fingerprint`` of a store whose files are named otherwise (e.g. still staged)."""
    from rhocli.core.fingerprint import sha256_files

    return sha256_files([idx_file, bin_file])


def check_fingerprint(prefix: str | Path, manifest: dict[str, Any], label: str = "") -> str:
    """The store's content still hashes to its manifest's fingerprint (reads every byte once)."""
    content = store_fingerprint(prefix)
    if manifest.get("fingerprint") != content:
        raise BadInputError(f"{label}{prefix}: content fingerprint {content[:19]}… differs from its manifest's "
                            f"{str(manifest.get('fingerprint'))[:19]}…; the files were changed after they were written")
    return content
