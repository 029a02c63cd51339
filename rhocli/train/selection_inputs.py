"""What selective training reads, checked before any worker starts: the reference losses from score
stores (one per --data prefix, made from exactly its tokens; or one sample store made for exactly this
run's data pipeline) or from the reference model run online (``--reference``), and the content of
every store a run reads, hashed against its manifest (``verify_content``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rhocli.core.errors import MismatchError, UsageError


def run_pipeline(cfg, refs, eod: int) -> dict[str, Any]:
    """The data pipeline of a run (``formats.sample_scores.pipeline_record``): what fixes its samples."""
    from rhocli.core.config import config_to_dict
    from rhocli.core.formats.sample_scores import pipeline_record

    return pipeline_record(config_to_dict(cfg), [(r.fingerprint, r.weight) for r in refs], eod)


def verify_content(prefix: str, manifest: dict | None, label: str) -> None:
    """A store read by this run is what its manifest says, byte for byte: its content hashed once
    here, before any step uses it (an edit in place, a .idx of another dataset). A store without a
    manifest (Megatron-LM's) has nothing to be checked against. Under torchrun every process builds
    the run's spec: only rank 0 reads the bytes (the others read the same files; a refusal there ends
    the job, torchrun stopping the other processes), not every rank of every node at once."""
    import os

    from rhocli.core.formats.manifest import check_fingerprint

    if int(os.environ.get("RANK", 0)) != 0:
        return
    if manifest and manifest.get("fingerprint"):
        check_fingerprint(prefix, manifest, label)


def is_sample_run(cfg) -> bool:
    from rhocli.core.formats.sample_scores import is_sample_store

    return bool(cfg.scores) and any(is_sample_store(p) for p in cfg.scores)


def check_reference(cfg, vocab: int, tokenizer_fp: str | None, num_microbatches: int):
    """--reference: a model the run's layout can hold, with the run's vocabulary and tokenizer, read
    by a score function that uses a reference; its fingerprint recorded (a resume must match)."""
    if not cfg.reference:
        return None
    import torch

    from parallel.config import ModelConfig
    from parallel.errors import LayoutError, ModelConfigError
    from parallel.hf import model_config_from_hf
    from parallel.layout import check_model_fits, check_virtual_pipeline
    from parallel.model import model_features, transformer_config
    from parallel.reference import ReferenceSpec, reference_features
    from parallel.score_functions import score_inputs
    from rhocli.core.model_source import resolve_model

    if cfg.scores:
        raise UsageError("--reference and --scores exclude each other (the reference losses come from the model run "
                         "online, or from a store)")
    if cfg.select_ratio is None:
        raise UsageError("--reference needs --select-ratio (the fraction of tokens to train on)")
    if not score_inputs(cfg.select_by) & {"ref_loss", "ref_entropy"}:
        raise UsageError(f"--reference: --select-by {cfg.select_by} reads no reference model (drop --reference)")
    source = resolve_model(cfg.reference, "--reference", model_config_from_hf)
    where = f"--reference {cfg.reference}"
    ref_model = ModelConfig(**source.manifest["model"])
    ref_vocab = int(source.manifest["vocab_size"])
    if ref_vocab != vocab:
        raise MismatchError(f"{where}: vocabulary {ref_vocab} differs from the run's {vocab} (the reference must "
                            "predict the run's tokens: the same tokenizer and vocab_size)")
    ref_tokenizer = source.manifest.get("tokenizer_fingerprint")
    if ref_tokenizer and tokenizer_fp and ref_tokenizer != tokenizer_fp:
        raise MismatchError(f"{where}: trained with another tokenizer than --data")
    if cfg.seq_length > ref_model.max_position_embeddings:
        raise MismatchError(f"{where}: max_position_embeddings {ref_model.max_position_embeddings} is below the run's "
                            f"seq_length {cfg.seq_length}")
    try:  # the run's layout must split the reference too (its own layers and heads)
        check_model_fits(ref_model, cfg.tp, cfg.pp)
        check_virtual_pipeline(cfg.virtual_pp, cfg.pp, ref_model.num_layers, num_microbatches)
        transformer_config(ref_model, cfg.tp, cfg.pp, torch.float32, **reference_features(model_features(cfg)))
    except (LayoutError, ModelConfigError) as err:
        raise MismatchError(f"{where}: the run's layout (--tp {cfg.tp} --pp {cfg.pp}"
                            f"{f' --virtual-pp {cfg.virtual_pp}' if cfg.virtual_pp else ''}) does not fit the "
                            f"reference model: {err}") from None
    return ReferenceSpec(model=ref_model, format=source.format, path=str(source.path),
                         fingerprint=source.description()["fingerprint"])


def _check_sample_store(cfg, refs, eod: int, needs: set):
    """--scores SAMPLE_STORE: one store for the whole blend, made for exactly this run's pipeline (and
    its entropy store when the score reads it)."""
    from parallel.trainer import DatasetRef
    from rhocli.core.formats.sample_scores import (check_sample_fingerprint, first_difference, is_sample_store,
                                                   read_sample_manifest)
    from rhocli.core.formats.scores import entropy_prefix

    if len(cfg.scores) != 1 or not all(is_sample_store(p) for p in cfg.scores):
        raise UsageError("--scores: a sample score store (rho score --for-run) serves the whole --data blend; give it "
                         "alone, not beside document stores")
    prefix = cfg.scores[0]
    mine = run_pipeline(cfg, refs, eod)
    out = []
    for store in [prefix] + ([entropy_prefix(prefix)] if "ref_entropy" in needs else []):
        if store != prefix and not Path(store + ".json").is_file():
            raise UsageError(f"--select-by {cfg.select_by} needs {store} (the reference entropy: rho score --for-run "
                             "--entropy)")
        manifest = read_sample_manifest(store, label="--scores ")
        check_sample_fingerprint(store, manifest, "--scores ")
        diff = first_difference(manifest.get("pipeline") or {}, mine)
        if diff:
            raise MismatchError(f"--scores {store}: scores the samples of another data pipeline ({diff}); score this "
                                "run's samples with rho score --for-run")
        out.append(DatasetRef(prefix=str(store), weight=None, fingerprint=manifest.get("fingerprint", "")))
    return tuple(out[:1]), tuple(out[1:])


def check_scores(cfg, refs, eod: int):
    """(score stores, entropy stores) for selective training: one per --data prefix, made from exactly
    its tokens, or one sample store for the run's pipeline; the entropy stores (``rho score
    --entropy``) only when the score reads them."""
    from parallel.score_functions import parse_score, score_inputs
    from rhocli.core.formats.scores import entropy_prefix

    if cfg.select_ratio is None:
        for flag, given in (("--scores", bool(cfg.scores)), ("--select-by", cfg.select_by != "excess"),
                            ("--select-after", bool(cfg.select_after)), ("--select-ratio START:END", cfg.select_ratio_start is not None)):
            if given:
                raise UsageError(f"{flag} needs --select-ratio (the fraction of tokens to train on)")
        return (), ()
    try:
        parse_score(cfg.select_by)
    except ValueError as err:
        raise UsageError(f"--select-by {err}") from None
    needs = score_inputs(cfg.select_by)
    if not cfg.scores:
        if needs & {"ref_loss", "ref_entropy"} and not cfg.reference:
            raise UsageError(f"--select-by {cfg.select_by} needs --scores SCORES_PREFIX (from rho score), one per --data, "
                             "or --reference MODEL")
        return (), ()  # training loss or random: no reference model; or the reference run online
    if is_sample_run(cfg):
        return _check_sample_store(cfg, refs, eod, needs)
    if len(cfg.scores) != len(refs):
        raise UsageError(f"--scores: give one score store per --data prefix ({len(refs)}), in the same order")
    stores, entropies = [], []
    for prefix, ref in zip(cfg.scores, refs):
        stores.append(_aligned_scores(prefix, ref, "--scores"))
        if "ref_entropy" in needs:
            entropy = entropy_prefix(prefix)
            if not Path(entropy + ".json").is_file():
                raise UsageError(f"--select-by {cfg.select_by} needs {entropy} (the reference entropy: rho score --entropy)")
            entropies.append(_aligned_scores(entropy, ref, "--scores"))
    return tuple(stores), tuple(entropies)


def _aligned_scores(prefix, ref, flag: str):
    """A score store made from exactly the tokens of ``ref`` (a --data prefix)."""
    from parallel.trainer import DatasetRef
    from rhocli.core.formats.scores import read_scores_manifest

    manifest = read_scores_manifest(prefix, label=f"{flag} ")
    verify_content(prefix, manifest, f"{flag} ")
    made_from = (manifest.get("token_dataset") or {}).get("fingerprint")
    if made_from != ref.fingerprint:
        raise MismatchError(f"{flag} {prefix}: scores token dataset {made_from}, not --data {ref.prefix} ({ref.fingerprint})")
    same_documents(prefix, ref.prefix, flag)
    return DatasetRef(prefix=str(prefix), weight=None, fingerprint=manifest.get("fingerprint", ""))


def same_documents(store: str, tokens: str, flag: str, data_flag: str = "--data") -> None:
    """A score or mask store has one value per token of its token dataset, document by document
    (megatron's sample indices read both with the same offsets)."""
    from rhocli.core.formats.indexed import read_index

    mine, theirs = read_index(store).document_lengths, read_index(tokens).document_lengths
    if mine.shape != theirs.shape or not (mine == theirs).all():
        raise MismatchError(f"{flag} {store}: {mine.size:,} documents of {int(mine.sum()):,} values, but {data_flag} {tokens} "
                            f"has {theirs.size:,} documents of {int(theirs.sum()):,} tokens; it belongs to other tokens")
