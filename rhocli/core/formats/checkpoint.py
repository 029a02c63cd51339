"""The rho checkpoint: a megatron-core ``dist_checkpointing`` directory plus a rho manifest.

A run directory looks like::

    RUN/
      latest                  -> "step_000200" (written last; names only complete checkpoints)
      step_000100/            a dist_checkpointing directory + rho_checkpoint.json + rng/
      step_000200/
      metrics.jsonl, train.config.yaml

``CheckpointStore`` is the sink the engine saves through (``parallel.checkpoint.save_checkpoint``):
every rank writes into ``RUN/.tmp-step_NNNNNN`` (``begin`` makes it), then rank 0 ``publish``es: the
manifest, the rename into place, and only then ``latest`` (write + rename). A run killed at any moment
leaves ``latest`` on the previous complete checkpoint. The readers here need no process group:
``resolve_checkpoint`` (a step or run directory), ``read_manifest``, and ``load_model_tensors``
(unsharded tensors, any TP/PP, through torch.distributed.checkpoint).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from rhocli.core.errors import BadInputError, MissingInputError
from rhocli.core.formats.manifest import ManifestType

CHECKPOINT = ManifestType("rho.checkpoint", 1, "checkpoint")
MANIFEST_NAME = "rho_checkpoint.json"
LATEST_NAME = "latest"
#: where ``--force`` keeps the run it replaces until the new run has published a checkpoint
REPLACED_NAME = ".replaced"
#: a run directory's files besides its checkpoints (metrics, resolved config): set aside with them
RUN_FILES = ("metrics.jsonl", "train.config.yaml")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def dangling_latest(run_dir: str | Path) -> str | None:
    """The step a run directory's ``latest`` names when that step is not a complete checkpoint."""
    latest = Path(run_dir) / LATEST_NAME
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    return None if (Path(run_dir) / name / MANIFEST_NAME).is_file() else name


def resolve_checkpoint(path: str | os.PathLike, label: str = "") -> Path:
    """The step directory ``path`` names: a step directory itself, or a run directory's ``latest``."""
    p = Path(path)
    if (p / MANIFEST_NAME).is_file():
        return p
    latest = p / LATEST_NAME
    if latest.is_file():
        target = p / latest.read_text().strip()
        if not (target / MANIFEST_NAME).is_file():
            raise MissingInputError(f"{label}{latest}: names {target.name}, which is not a complete checkpoint")
        return target
    if not p.exists():
        raise MissingInputError(f"{label}{p}: checkpoint not found")
    raise MissingInputError(f"{label}{p}: not a rho checkpoint (no {MANIFEST_NAME}, no '{LATEST_NAME}' pointer)")


def read_manifest(step_dir: str | Path, label: str = "") -> dict[str, Any]:
    return CHECKPOINT.read(Path(step_dir) / MANIFEST_NAME, label)


def latest_step_dir(run_dir: str | Path) -> Path | None:
    try:
        return resolve_checkpoint(run_dir)
    except MissingInputError:
        return None


def checkpoint_fingerprint(step_dir: str | Path) -> str:
    """Identity of a checkpoint: its manifest and dist_checkpointing metadata (cheap; the tensors'
    bytes are named by the metadata's shard layout and the manifest's step and config)."""
    from rhocli.core.fingerprint import sha256_files

    step_dir = Path(step_dir)
    return sha256_files([p for p in (step_dir / MANIFEST_NAME, step_dir / "metadata.json") if p.exists()])


class CheckpointStore:
    """A run directory's checkpoints: where they are staged, published and found."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def step_dir(self, step: int) -> Path:
        return self.run_dir / step_dir_name(step)

    def complete_steps(self) -> list[tuple[int, Path]]:
        """Every published checkpoint of the run, (step, directory) in step order."""
        if not self.run_dir.is_dir():
            return []
        found = []
        for d in self.run_dir.glob("step_*"):
            if d.is_dir() and (d / MANIFEST_NAME).is_file() and d.name[5:].isdigit():
                found.append((int(d.name[5:]), d))
        return sorted(found)

    def staging_dir(self, step: int) -> Path:
        return self.run_dir / f".tmp-{step_dir_name(step)}"

    def begin(self, step: int) -> Path:
        """Rank 0, before every rank writes: an empty staging directory (dist_checkpointing wants one)."""
        tmp = self.staging_dir(step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def publish(self, step: int, fields: dict[str, Any]) -> Path:
        """Rank 0, after every rank wrote: the manifest (``step`` first, then ``fields``), the staging
        directory renamed into place, then ``latest``. Returns the step directory."""
        tmp, final = self.staging_dir(step), self.step_dir(step)
        CHECKPOINT.write(tmp / MANIFEST_NAME, {"step": step, **fields})
        if final.exists():  # never deleted: kept beside the run (nothing rho publishes names it)
            os.replace(final, self.run_dir / f".superseded-{final.name}-{os.getpid()}")
        os.replace(tmp, final)
        pointer_tmp = self.run_dir / f".{LATEST_NAME}.tmp"
        pointer_tmp.write_text(step_dir_name(step) + "\n")
        os.replace(pointer_tmp, self.run_dir / LATEST_NAME)
        # the new run has a checkpoint to show: the run it replaced (--force) can go now
        shutil.rmtree(self.run_dir / REPLACED_NAME, ignore_errors=True)
        return final

    # ------------------------------------------------------------ replacing a run (--force)
    @property
    def replaced_dir(self) -> Path:
        return self.run_dir / REPLACED_NAME

    def _run_entries(self) -> list[Path]:
        if not self.run_dir.is_dir():
            return []
        names = {LATEST_NAME, *RUN_FILES}
        return sorted(p for p in self.run_dir.iterdir() if p.name in names or p.name.startswith("step_"))

    def set_aside(self) -> bool:
        """``--force``: move the run's checkpoints, ``latest``, metrics and config into ``.replaced/``
        (nothing is deleted yet); ``publish`` removes them once the new run has a checkpoint. Returns
        whether there was anything to set aside."""
        entries = self._run_entries()
        if not entries:
            return False
        self.replaced_dir.mkdir(exist_ok=False)
        for entry in entries:
            os.replace(entry, self.replaced_dir / entry.name)
        return True

    def put_back(self) -> bool:
        """The replacing run ended before its first checkpoint: its files go, the replaced run's come
        back as they were. Returns whether a run was put back."""
        if not self.replaced_dir.is_dir() or (self.run_dir / LATEST_NAME).exists():
            return False
        for entry in self._run_entries():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in sorted(self.replaced_dir.iterdir()):
            os.replace(entry, self.run_dir / entry.name)
        self.replaced_dir.rmdir()
        return True

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """(step directory, manifest) of the latest complete checkpoint, or None."""
        step_dir = latest_step_dir(self.run_dir)
        return None if step_dir is None else (step_dir, read_manifest(step_dir))

    def clean_stale_temporaries(self) -> None:
        """Remove checkpoints a killed run left half-written (rank 0, before training starts)."""
        for tmp in self.run_dir.glob(".tmp-step_*"):
            shutil.rmtree(tmp, ignore_errors=True)


def check_checkpoint_files(step_dir: str | Path, label: str = "") -> int:
    """Every file a checkpoint's dist_checkpointing metadata names exists and holds at least the bytes
    it records (a truncated or missing shard is found before a load fails on it). Returns the number
    of data files; raises BadInputError naming the first problem."""
    from torch.distributed.checkpoint import FileSystemReader

    step_dir = Path(step_dir)
    read_manifest(step_dir, label)
    try:
        metadata = FileSystemReader(str(step_dir)).read_metadata()
    except Exception as err:  # missing or unreadable .metadata
        raise BadInputError(f"{label}{step_dir}: unreadable dist_checkpointing metadata ({type(err).__name__})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name, size in sorted(needed.items()):
        path = step_dir / name
        if not path.is_file():
            raise BadInputError(f"{label}{path}: missing (the checkpoint's metadata names it)")
        if path.stat().st_size < size:
            raise BadInputError(f"{label}{path}: {path.stat().st_size:,} bytes, the metadata needs {size:,}; truncated")
    if not (step_dir / "common.pt").is_file():
        raise BadInputError(f"{label}{step_dir / 'common.pt'}: missing")
    return len(needed)


def model_tensor_names(step_dir: str | Path) -> list[str]:
    """Names of the model's (unsharded) tensors stored in a checkpoint, read from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(step_dir)).read_metadata()
    return sorted(
        key for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer.") and "_extra_state" not in key
    )


def load_model_tensors(step_dir: str | Path, names: list[str] | None = None):
    """Model tensors of a checkpoint, unsharded (TP/PP merged), without a process group.

    dist_checkpointing's default format is torch.distributed.checkpoint, which stores every tensor
    in its global shape; reading a subset of keys keeps memory near the tensors asked for.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(str(step_dir))
    metadata = reader.read_metadata().state_dict_metadata
    wanted = names if names is not None else model_tensor_names(step_dir)
    state = {k: torch.empty(metadata[k].size, dtype=metadata[k].properties.dtype) for k in wanted}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state
