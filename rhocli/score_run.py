"""``rho score`` outside the engine: validation into a ``parallel.scorer.ScoreSpec``, and the rank entry."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Any

from rhocli.errors import (
    LoadError,
    MismatchError,
    MissingInputError,
    NotAvailableError,
    OutputExistsError,
    UsageError,
)


def build_score_spec(model: str, data: str, output: str, tp: int, pp: int, dp: int | None, seq_len: int | None,
                     stride: int | None, micro_batch_size: int, resume: bool, force: bool,
                     shard_documents: int, world_size: int | None = None):
    from parallel import checkpoint as ckpt
    from parallel.config import ModelConfig, padded_vocab_size
    from parallel.model import transformer_config
    from parallel.scorer import ScoreSpec
    from rhocli.formats.tokens import TokenDataset

    mpath = Path(model)
    if mpath.is_dir() and (mpath / "config.json").is_file() and not (mpath / ckpt.MANIFEST_NAME).exists():
        raise NotAvailableError(f"--model {model}: Hugging Face models are read once rho convert-hf lands; pass a rho checkpoint")
    try:
        step_dir = ckpt.resolve_checkpoint(model)
        manifest = ckpt.read_manifest(step_dir)
    except ckpt.CheckpointError as err:
        raise MissingInputError(f"--model {err}") from None
    model_cfg = ModelConfig(**manifest["model"])
    vocab = int(manifest["vocab_size"])
    ds = TokenDataset(data)
    tok = (ds.manifest or {}).get("tokenizer") or {}
    if tok.get("fingerprint") and manifest.get("tokenizer_fingerprint") and tok["fingerprint"] != manifest["tokenizer_fingerprint"]:
        raise MismatchError(f"--data {data}: tokenized with another tokenizer than the model {step_dir} was trained on")
    if tok.get("vocab_size") and int(tok["vocab_size"]) > vocab:
        raise MismatchError(f"--data {data}: vocabulary {tok['vocab_size']} does not fit the model's {vocab}")
    eod = tok.get("eod_id", manifest.get("eod_id"))
    if eod is None:
        raise MismatchError(f"--data {data}: no end-of-document id in its manifest")
    trained_seq = int((manifest.get("config") or {}).get("train", {}).get("seq_length") or model_cfg.max_position_embeddings)
    window = seq_len or trained_seq
    if not 1 <= window <= model_cfg.max_position_embeddings:
        raise UsageError(f"--seq-len {window} must be in [1, max_position_embeddings={model_cfg.max_position_embeddings}]")
    stride = stride or max(1, window // 2)
    if not 1 <= stride <= window:
        raise UsageError(f"--stride {stride} must be in [1, --seq-len {window}]")
    if micro_batch_size < 1 or shard_documents < 1:
        raise UsageError("--micro-batch-size and --shard-documents must be >= 1")
    if world_size is None:
        world_size = tp * pp * (dp or 1)
    if world_size % (tp * pp):
        raise UsageError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide the world size {world_size}")
    try:
        import torch

        transformer_config(model_cfg, tp, pp, torch.float32)
        padded_vocab_size(vocab, tp, model_cfg.make_vocab_size_divisible_by)
    except ValueError as err:
        raise UsageError(str(err)) from None

    out = Path(output)
    finals = [Path(output + ext) for ext in (".bin", ".idx", ".json")]
    work = Path(output + ".rho-work")
    if any(p.exists() for p in finals) and not force:
        raise OutputExistsError(f"{output}.json: score store already exists; pass --force to replace it")
    if work.exists() and not resume:
        if not force:
            raise OutputExistsError(f"{work}: an unfinished scoring run is there; pass --resume to continue it or --force to start over")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    meta = step_dir / "metadata.json"
    digest = hashlib.sha256((step_dir / ckpt.MANIFEST_NAME).read_bytes() + (meta.read_bytes() if meta.exists() else b""))
    extra = {
        "reference_model": {"checkpoint": str(step_dir), "step": manifest.get("step"),
                            "config_hash": manifest.get("config_hash"), "fingerprint": "sha256:" + digest.hexdigest()},
        "tokenizer_fingerprint": tok.get("fingerprint"),
    }
    spec = ScoreSpec(
        model=model_cfg, vocab_size=vocab, checkpoint=str(step_dir), tokens=str(data), tokens_fingerprint=ds.fingerprint(),
        output=str(output), window=window, stride=stride, micro_batch_size=micro_batch_size,
        microbatches_per_call=8, shard_documents=shard_documents, eod_id=int(eod), tp=tp, pp=pp, manifest_extra=extra,
    )
    return spec, world_size, work


def spec_from_dict(d: dict[str, Any]):
    from parallel.config import ModelConfig
    from parallel.scorer import ScoreSpec

    d = dict(d)
    d["model"] = ModelConfig(**d["model"])
    return ScoreSpec(**d)


def run_score_rank(spec_dict: dict[str, Any], on_event=None) -> dict[str, Any]:
    from parallel.checkpoint import CheckpointError
    from parallel.distributed import destroy_distributed, init_distributed
    from parallel.scorer import Scorer

    spec = spec_from_dict(spec_dict)
    try:
        try:
            layout = init_distributed(spec.tp, spec.pp, seed=0)
        except ValueError as err:
            raise UsageError(str(err)) from None
        try:
            return Scorer(spec, layout, on_event if layout.rank == 0 else None).run()
        except CheckpointError as err:
            raise LoadError(str(err)) from None
    finally:
        destroy_distributed()


def spec_to_dict(spec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def clear_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
