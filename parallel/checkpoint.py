"""Checkpoints: megatron-core ``dist_checkpointing`` (reshardable across TP/PP/DP) + a rho manifest.

A run directory looks like::

    RUN/
      latest                  -> "step_000200" (written last; names only complete checkpoints)
      step_000100/            a dist_checkpointing directory + rho_checkpoint.json + rng/
      step_000200/
      metrics.jsonl, train.config.yaml

A checkpoint is written into ``RUN/.tmp-step_NNNNNN`` by every rank, completed with the rho manifest
by rank 0, then renamed into place, and only then is ``latest`` replaced (write + rename), so a run
killed at any moment leaves ``latest`` on the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "rho.checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
MANIFEST_NAME = "rho_checkpoint.json"
LATEST_NAME = "latest"


class CheckpointError(ValueError):
    """A checkpoint path that is missing, incomplete or not a rho checkpoint (one-line message)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step directory ``path`` names: a step directory itself, or a run directory's ``latest``."""
    p = Path(path)
    if (p / MANIFEST_NAME).is_file():
        return p
    latest = p / LATEST_NAME
    if latest.is_file():
        target = p / latest.read_text().strip()
        if not (target / MANIFEST_NAME).is_file():
            raise CheckpointError(f"{latest}: names {target.name}, which is not a complete checkpoint")
        return target
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found")
    raise CheckpointError(f"{p}: not a rho checkpoint (no {MANIFEST_NAME}, no '{LATEST_NAME}' pointer)")


def read_manifest(step_dir: Path) -> dict[str, Any]:
    from parallel.manifest import read_versioned_json

    return read_versioned_json(Path(step_dir) / MANIFEST_NAME, CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION,
                               CheckpointError, "checkpoint")


def latest_step_dir(run_dir: Path) -> Path | None:
    try:
        return resolve_checkpoint(run_dir)
    except CheckpointError:
        return None


def _sharded_state_dict(model_chunks, optimizer, is_loading: bool) -> dict[str, Any]:
    # One model chunk per rank (no virtual pipeline): key "model" as Megatron-LM uses.
    model = model_chunks[0]
    module = getattr(model, "module", model)
    state: dict[str, Any] = {"model": module.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading)
    return state


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> bool:
    """Restore RNG states saved on the same kind of device; False (seeds stay) across CPU/GPU."""
    from megatron.core import tensor_parallel

    if ("cuda" in state) != torch.cuda.is_available():
        return False
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    return True


def save_checkpoint(run_dir: Path, step: int, model_chunks, optimizer, manifest: dict[str, Any]) -> Path:
    """Save on every rank (collective). Returns the published step directory."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    run_dir = Path(run_dir)
    rank = dist.get_rank()
    name = step_dir_name(step)
    tmp = run_dir / f".tmp-{name}"
    final = run_dir / name
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    # dist_checkpointing wants an empty directory; per-rank RNG states go in beside its files after.
    dist_checkpointing.save(_sharded_state_dict(model_chunks, optimizer, is_loading=False), str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")
    _fault_injection_pause()
    dist.barrier()
    if rank == 0:
        full = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "step": step,
            "world_size": dist.get_world_size(),
            **manifest,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(full, indent=2) + "\n")
        if final.exists():  # an older run's checkpoint of the same step (e.g. after --init restart)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = run_dir / f".{LATEST_NAME}.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, run_dir / LATEST_NAME)
    dist.barrier()
    return final


def _fault_injection_pause() -> None:
    """Test hook: RHO_FAULT_SLEEP_IN_SAVE=SECONDS holds a save between writing and publishing, so a
    test can kill the run at exactly that moment. Unset in normal use."""
    seconds = os.environ.get("RHO_FAULT_SLEEP_IN_SAVE")
    if seconds:
        import time

        time.sleep(float(seconds))


def model_tensor_names(step_dir: Path) -> list[str]:
    """Names of the model's (unsharded) tensors stored in a checkpoint, read from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(step_dir)).read_metadata()
    return sorted(
        key for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer.") and "_extra_state" not in key
    )


def load_model_tensors(step_dir: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Model tensors of a checkpoint, unsharded (TP/PP merged), without a process group.

    dist_checkpointing's default format is torch.distributed.checkpoint, which stores every tensor
    in its global shape; reading a subset of keys keeps memory near the tensors asked for.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(str(step_dir))
    metadata = reader.read_metadata().state_dict_metadata
    wanted = names if names is not None else model_tensor_names(step_dir)
    state = {k: torch.empty(metadata[k].size, dtype=metadata[k].properties.dtype) for k in wanted}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def load_checkpoint(step_dir: Path, model_chunks, optimizer=None, load_rng: bool = False) -> dict[str, Any]:
    """Load weights (and optimizer state, RNG when asked) on every rank; returns the rho manifest."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    manifest = read_manifest(step_dir)
    state = dist_checkpointing.load(_sharded_state_dict(model_chunks, optimizer, is_loading=True), str(step_dir))
    model = model_chunks[0]
    model.load_state_dict(state["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if load_rng:
        rng_file = Path(step_dir) / "rng" / f"rank{dist.get_rank():05d}.pt"
        if manifest.get("world_size") == dist.get_world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
    return manifest


def clean_stale_temporaries(run_dir: Path) -> None:
    """Remove checkpoints a killed run left half-written (rank 0, before training starts)."""
    for tmp in Path(run_dir).glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
