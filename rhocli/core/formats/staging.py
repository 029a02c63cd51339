"""Publish outputs only when complete.

``StagedOutput`` gives each final path a twin inside a hidden temporary directory next to it. When
the work succeeds, ``commit`` moves the twins into place (replacing old files only then, and only with
``force``); when it fails or is interrupted, the temporary directory is removed. A run killed with
SIGKILL leaves at most a hidden ``.rho-tmp-*`` directory, never a partial file under the final name,
and never destroys what the user had.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rhocli.core.errors import OutputExistsError, UsageError


def check_outputs_free(paths: list[Path], force: bool, what: str = "output") -> None:
    for path in paths:
        if path.exists() and not force:
            raise OutputExistsError(f"{path}: {what} already exists; pass --force to replace it")
        if path.exists() and path.is_dir() and not path.is_symlink() and path.suffix in (".bin", ".idx", ".json"):
            raise OutputExistsError(f"{path}: is a directory; refusing to replace it even with --force")


class StagedOutput:
    def __init__(self, final_paths: list[Path], force: bool = False):
        self.final_paths = [Path(p) for p in final_paths]
        self.force = force
        parents = {p.parent for p in self.final_paths}
        if len(parents) != 1:
            raise ValueError("staged outputs must share one directory")
        self.parent = parents.pop()
        self.tmpdir: Path | None = None
        self.created: Path | None = None

    def __enter__(self) -> "StagedOutput":
        if not self.parent.exists():
            missing = [p for p in [self.parent, *self.parent.parents] if not p.exists()]
            try:
                self.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UsageError(f"{self.parent}: cannot create output directory ({err.strerror})") from err
            #: the directory made for the output (the caller says so); removed again if the work fails
            self.created = missing[-1]
        check_outputs_free(self.final_paths, self.force)
        try:
            self.tmpdir = Path(tempfile.mkdtemp(prefix=f".rho-tmp-{self.final_paths[0].name}-", dir=self.parent))
        except OSError as err:
            raise UsageError(f"{self.parent}: output directory is not writable ({err.strerror})") from err
        return self

    def path(self, final: Path) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / Path(final).name

    def commit(self) -> None:
        """Move every staged file into place; the last one listed is moved last (make it the manifest)."""
        assert self.tmpdir is not None
        check_outputs_free(self.final_paths, self.force)
        for final in self.final_paths:
            os.replace(self.path(final), final)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.tmpdir = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
            if self.created is not None:  # failed: the directories made for it go too, if still empty
                for d in [self.parent, *self.parent.parents]:
                    try:
                        d.rmdir()
                    except OSError:
                        break
                    if d == self.created:
                        break
                self.created = None
