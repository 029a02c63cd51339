"""``rho score`` outside the engine: validation into a ``parallel.scorer.ScoreSpec``, and the rank entry.

``--model`` is resolved by ``resolve_model``: a rho checkpoint (run or step directory) or a Hugging
Face Llama/Mistral directory, which the ranks load directly (``parallel.hf.load_hf_into_model``);
its defaults (window, EOD id, tokenizer fingerprint) come from its config.json and tokenizer file as
``rho convert-hf --from-hf`` would record them (``rhocli.convert.read_hf_dir``).
Megatron-core is imported with ``torch.compile`` deferred (``lazy_torch_compile``): 1.3 s less
start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import shutil
from pathlib import Path
from typing import Any

from rhocli.errors import (
    LoadError,
    MismatchError,
    MissingInputError,
    OutputExistsError,
    UsageError,
)


@contextlib.contextmanager
def lazy_torch_compile():
    """Import megatron-core with ``torch.compile`` deferred to each decorated function's first call.

    megatron-core decorates its fusion helpers with ``torch.compile`` at import time, which imports
    TorchInductor: 1.3 s of the 2 s megatron import on the 2-core VM. rho's model uses none of
    them (bias/activation, RoPE and softmax fusions are off), so a scoring process never pays for
    the compiler; a helper that is called is compiled on that call, exactly as it would have been.
    """
    import torch

    real = torch.compile

    def lazy(model=None, **kwargs):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: lazy(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **kwargs)
            return compiled(*args, **kw)

        return call

    torch.compile = lazy
    try:
        yield
    finally:
        torch.compile = real


def import_engine() -> None:
    """Import the scoring engine (megatron-core) quickly: see ``lazy_torch_compile``."""
    with lazy_torch_compile():
        import parallel.scorer  # noqa: F401
        import parallel.distributed  # noqa: F401
        import megatron.core.pipeline_parallel  # noqa: F401


@dataclasses.dataclass
class ModelSource:
    """What ``--model`` names: a rho checkpoint (step directory) or a Hugging Face model directory.

    ``manifest`` has the fields of a rho checkpoint manifest that scoring reads (model, vocab_size,
    tokenizer_fingerprint, eod_id, config.train.seq_length); for a HF directory they come from its
    config.json and tokenizer file, as ``rho convert-hf --from-hf`` would record them."""

    format: str  # "rho" | "huggingface"
    path: Path
    manifest: dict[str, Any]
    fingerprint: str | None  # None: computed by description() (a HF model's weights are hashed)

    def description(self) -> dict[str, Any]:
        """The score store manifest's ``reference_model``."""
        if self.format == "huggingface":
            from parallel.hf import HFReader

            return {"huggingface": str(self.path.resolve()), "architecture": self.manifest["model"]["architecture"],
                    "fingerprint": self.fingerprint or HFReader(self.path).fingerprint()}
        return {"checkpoint": str(self.path), "step": self.manifest.get("step"),
                "config_hash": self.manifest.get("config_hash"), "fingerprint": self.fingerprint}


def resolve_model(model: str) -> ModelSource:
    """``--model``: a rho checkpoint (run or step directory) or a HF Llama/Mistral directory."""
    from parallel import checkpoint as ckpt

    mpath = Path(model)
    try:
        step_dir = ckpt.resolve_checkpoint(model)
    except ckpt.CheckpointError as err:
        if not mpath.exists():
            raise MissingInputError(f"--model {model}: not found") from None
        if (mpath / ckpt.LATEST_NAME).is_file():  # a run directory whose latest step is incomplete
            raise MissingInputError(f"--model {err}") from None
        if not (mpath / "config.json").is_file():
            raise MissingInputError(f"--model {model}: neither a rho checkpoint (no {ckpt.MANIFEST_NAME} or "
                                    f"'{ckpt.LATEST_NAME}') nor a Hugging Face model directory (no config.json)") from None
    else:
        try:
            manifest = ckpt.read_manifest(step_dir)
        except ckpt.CheckpointError as err:
            raise MissingInputError(f"--model {err}") from None
        meta = step_dir / "metadata.json"
        digest = hashlib.sha256((step_dir / ckpt.MANIFEST_NAME).read_bytes() + (meta.read_bytes() if meta.exists() else b""))
        return ModelSource("rho", step_dir, manifest, "sha256:" + digest.hexdigest())

    from rhocli.convert import read_hf_dir

    hf = read_hf_dir(model, label="--model ")
    manifest = {
        "model": dataclasses.asdict(hf.model),
        "vocab_size": hf.model.vocab_size,
        "tokenizer_fingerprint": hf.tokenizer_fingerprint,
        "eod_id": hf.eos_id,
        "config": {"train": {"seq_length": hf.seq_length}},
    }
    return ModelSource("huggingface", hf.path, manifest, None)


def build_score_spec(model: str, data: str, output: str, tp: int, pp: int, dp: int | None, seq_len: int | None,
                     stride: int | None, micro_batch_size: int | None, resume: bool, force: bool,
                     shard_documents: int, world_size: int | None = None):
    import_engine()
    from parallel.config import ModelConfig, padded_vocab_size
    from parallel.model import transformer_config
    from parallel.scorer import ScoreSpec
    from rhocli.formats.tokens import TokenDataset

    source = resolve_model(model)
    manifest = source.manifest
    model_cfg = ModelConfig(**manifest["model"])
    vocab = int(manifest["vocab_size"])
    ds = TokenDataset(data)
    tok = (ds.manifest or {}).get("tokenizer") or {}
    if tok.get("fingerprint") and manifest.get("tokenizer_fingerprint") and tok["fingerprint"] != manifest["tokenizer_fingerprint"]:
        raise MismatchError(f"--data {data}: tokenized with another tokenizer than the model {source.path} was trained on")
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
    if (micro_batch_size is not None and micro_batch_size < 1) or shard_documents < 1:
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
    extra = {"reference_model": source.description(), "tokenizer_fingerprint": tok.get("fingerprint")}
    spec = ScoreSpec(
        model=model_cfg, vocab_size=vocab, checkpoint=str(source.path), model_format=source.format, tokens=str(data), tokens_fingerprint=ds.fingerprint(),
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
    import_engine()
    from parallel.checkpoint import CheckpointError
    from parallel.distributed import destroy_distributed, init_distributed
    from parallel.hf import HFConversionError
    from parallel.scorer import Scorer

    spec = spec_from_dict(spec_dict)
    try:
        try:
            layout = init_distributed(spec.tp, spec.pp, seed=0)
        except ValueError as err:
            raise UsageError(str(err)) from None
        try:
            return Scorer(spec, layout, on_event if layout.rank == 0 else None).run()
        except (CheckpointError, HFConversionError) as err:
            raise LoadError(f"--model {err}") from None
    finally:
        destroy_distributed()


def spec_to_dict(spec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def clear_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
