"""Publish outputs only when complete.

``StagedOutput`` gives each final path a twin inside a hidden temporary directory next to it. When
the work succeeds, ``commit`` moves the twins into place (replacing old files only then, and only with
``force``); when it fails or is interrupted, the temporary directory is removed. A run killed with
SIGKILL leaves at most a hidden ``.rho-tmp-*`` directory, never a partial file under the final name,
and never destroys what the user had.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from rhocli.core.errors import OutputExistsError, UsageError


def _unwritable(err: OSError, otherwise: type) -> type:
    """StorageError (its own exit code) when the OS refused the write, else ``otherwise``."""
    from rhocli.core.errors import STORAGE_ERRNOS, StorageError

    return StorageError if err.errno in STORAGE_ERRNOS else otherwise


@contextlib.contextmanager
def writing_to(path: str | Path):
    """A storage OSError raised in the block without a file name gets ``path`` as its file name, so
    the one line a user sees says which output could not be written."""
    from rhocli.core.errors import STORAGE_ERRNOS

    try:
        yield
    except OSError as err:
        if err.errno in STORAGE_ERRNOS and err.filename is None:
            err.filename = str(path)
        raise


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
                raise _unwritable(err, UsageError)(f"{self.parent}: cannot create output directory ({err.strerror})") from err
            #: the directory made for the output (the caller says so); removed again if the work fails
            self.created = missing[-1]
        check_outputs_free(self.final_paths, self.force)
        try:
            self.tmpdir = Path(tempfile.mkdtemp(prefix=f".rho-tmp-{self.final_paths[0].name}-", dir=self.parent))
        except OSError as err:
            raise _unwritable(err, UsageError)(f"{self.parent}: output directory is not writable ({err.strerror})") from err
        return self

    def path(self, final: Path) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / Path(final).name

    def staged_writes(self):
        """Context for the work that writes the staged files: a storage error there (no space, a
        read-only filesystem) names the output it was writing when the OS did not name a file."""
        return writing_to(self.final_paths[0])

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


class StagedDirectory:
    """A directory output (a converted checkpoint, an exported HF model) published whole.

    ``with StagedDirectory(dest, force, flag) as tmp:`` holds ``dest``'s output lock (``DEST.rho-lock``:
    a second rho on the same output is refused, naming the holder), builds into a hidden sibling with a
    unique name, and on success moves it into place. Nothing it did not create is deleted: an output
    that appeared at ``dest`` during the run is kept and the run refused; with ``force`` the old output
    is renamed aside first and removed only once the new one is in place (renamed back if the move
    fails). A kill in between leaves the old output in ``.rho-replaced-NAME-*``, which the next run on
    ``dest`` puts back before anything else."""

    def __init__(self, dest: str | Path, force: bool, label: str = ""):
        self.dest = Path(dest)
        self.force = force
        self.label = label
        self.tmp: Path | None = None
        self._lock = None

    def _asides(self) -> list[Path]:
        return sorted(self.dest.parent.glob(f".rho-replaced-{self.dest.name}-*"))

    def __enter__(self) -> Path:
        from rhocli.core.lock import OutputLock

        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _unwritable(err, UsageError)(f"{self.label}{self.dest.parent}: cannot create output directory "
                                               f"({err.strerror})") from err
        self._lock = OutputLock(self.dest.with_name(self.dest.name + ".rho-lock"), f"{self.label}{self.dest}")
        self._lock.acquire()
        try:
            asides = self._asides()
            if asides and not os.path.lexists(self.dest):  # a --force swap was killed midway: the old output returns
                os.rename(asides[-1], self.dest)
            if os.path.lexists(self.dest) and not self.force:
                raise OutputExistsError(f"{self.label}{self.dest}: already exists; pass --force to replace it")
            try:
                self.tmp = Path(tempfile.mkdtemp(prefix=f".rho-tmp-{self.dest.name}-", dir=self.dest.parent))
            except OSError as err:
                raise _unwritable(err, UsageError)(f"{self.label}{self.dest.parent}: output directory is not writable "
                                                   f"({err.strerror})") from err
        except BaseException:
            self._lock.release()
            raise
        return self.tmp

    def _publish(self) -> None:
        _fault_pause("RHO_FAULT_SLEEP_IN_PUBLISH")
        if os.path.lexists(self.dest):
            if not self.force:
                raise OutputExistsError(f"{self.label}{self.dest}: appeared while rho was writing it; it is kept and "
                                        "nothing was published (pass --force to replace it)")
            aside = Path(tempfile.mkdtemp(prefix=f".rho-replaced-{self.dest.name}-", dir=self.dest.parent))
            os.rmdir(aside)  # a unique name, free for the rename
            os.rename(self.dest, aside)
            _fault_pause("RHO_FAULT_SLEEP_IN_SWAP")
            try:
                os.rename(self.tmp, self.dest)
            except BaseException:
                os.rename(aside, self.dest)
                raise
            shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
            return
        try:
            os.rename(self.tmp, self.dest)  # fails on a non-empty directory that appeared meanwhile
        except OSError as err:
            raise OutputExistsError(f"{self.label}{self.dest}: appeared while rho was writing it; it is kept and "
                                    f"nothing was published ({err.strerror})") from None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._publish()
        finally:
            if self.tmp is not None and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
            self._lock.release()


def _fault_pause(variable: str) -> None:
    """Test hook: VARIABLE=SECONDS holds a publish at its most delicate moment, so that a test can kill
    the process exactly there. Unset in normal use."""
    seconds = os.environ.get(variable)
    if seconds:
        import time

        time.sleep(float(seconds))
