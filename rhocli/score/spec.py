"""``rho score`` before any worker starts: ``--model`` resolved, every option validated, into a
``ScoreJob`` (the engine's ``parallel.scorer.ScoreSpec`` plus where the store goes and what its
manifest says).

``--model`` is a rho checkpoint (run or step directory) or a Hugging Face Llama/Mistral directory,
which the ranks load directly (``parallel.hf.load_hf_into_model``); its defaults (window, EOD id,
tokenizer fingerprint) come from its config.json and tokenizer file as ``rho convert-hf --from-hf``
would record them.
"""

from __future__ import annotations

from pathlib import Path

from rhocli.core.errors import MismatchError, OutputExistsError, UsageError
from rhocli.core.model_source import resolve_model


#: how a resume's refusal names each setting (the flags that set it)
RESUME_NAMES = {"reference_model": "--model (its fingerprint)", "tokens": "--data (its fingerprint)",
                "window": "--seq-len", "stride": "--stride", "shard_documents": "--shard-documents",
                "micro_batch_size": "--micro-batch-size", "tp": "--tp", "pp": "--pp"}


def build_score_job(model: str, data: str, output: str, tp: int, pp: int, dp: int | None, seq_len: int | None,
                    stride: int | None, micro_batch_size: int | None, resume: bool, force: bool,
                    shard_documents: int, world_size: int | None = None, sequence_parallel: bool = False,
                    entropy: bool = False):
    """Validate ``rho score``'s options; returns (ScoreJob, world size). Nothing is written but the
    output's parent directory."""
    from rhocli.score.rank import import_engine

    import_engine()
    import torch

    from parallel.config import ModelConfig
    from parallel.hf import model_config_from_hf
    from parallel.layout import check_sequence_parallel, data_parallel_size, padded_vocab_size
    from parallel.model import transformer_config
    from parallel.scorer import ScoreSpec
    from rhocli.core.formats.scores import ScoreStoreWriter
    from rhocli.core.formats.tokens import TokenDataset
    from rhocli.score.job import ScoreJob

    source = resolve_model(model, "--model", model_config_from_hf)
    manifest = source.manifest
    model_cfg = ModelConfig(**manifest["model"])
    vocab = int(manifest["vocab_size"])
    ds = TokenDataset(data)
    tok = ds.tokenizer
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
    # the engine's layout checks (LayoutError: the CLI names the sizes by their flags)
    data_parallel_size(world_size, tp, pp, dp)
    check_sequence_parallel(sequence_parallel, tp, tp)  # windows are padded to a multiple of tp
    transformer_config(model_cfg, tp, pp, torch.float32, **({"sequence_parallel": True} if sequence_parallel else {}))
    padded_vocab_size(vocab, tp, model_cfg.make_vocab_size_divisible_by)

    reference_model = source.description()
    settings = {"reference_model": reference_model["fingerprint"], "tokens": ds.fingerprint(), "window": window,
                "stride": stride, "shard_documents": shard_documents, "micro_batch_size": micro_batch_size,
                "tp": tp, "pp": pp}
    from rhocli.core.formats.scores import entropy_prefix

    # the entropy store is a second output, checked (and resumed) like the first
    writers = [ScoreStoreWriter(p, settings=settings) for p in [output] + ([entropy_prefix(output)] if entropy else [])]
    for writer in writers:
        if any(p.exists() for p in writer.final_paths) and not force:
            raise OutputExistsError(f"{writer.output}.json: score store already exists; pass --force to replace it")
        if writer.work.exists() and not resume and not force:
            raise OutputExistsError(f"{writer.work}: an unfinished scoring run is there; pass --resume to continue it or --force to start over")
    out = Path(output)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    engine = ScoreSpec(
        model=model_cfg, vocab_size=vocab, tokens=str(data), window=window, stride=stride,
        micro_batch_size=micro_batch_size, microbatches_per_call=8, shard_documents=shard_documents,
        eod_id=int(eod), tp=tp, pp=pp, sequence_parallel=sequence_parallel, entropy=entropy,
    )
    for writer in writers:
        if writer.work.exists() and resume:
            writer.check_resume(RESUME_NAMES)
    fields = {
        "window": {"tokens": window, "stride": stride},
        "token_dataset": {"prefix": str(data), "fingerprint": ds.fingerprint()},
        "reference_model": reference_model,
        "tokenizer_fingerprint": tok.get("fingerprint"),
    }
    return ScoreJob(engine, str(output), source.format, str(source.path), fields, settings), world_size
