"""Turn ``rho train`` options into a validated ``parallel.trainer.RunSpec``, before any worker starts.

Everything a user can get wrong is checked here, in one process, with a one-line error naming the
file or flag: the YAML, the data prefixes and their manifests, tokenizer/vocab agreement between the
datasets, the model and the checkpoint to resume or initialise from, and the parallel layout.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from rhocli.config import config_from_mapping, config_to_dict, load_yaml_mapping
from rhocli.errors import ConfigError, MismatchError, MissingInputError, OutputExistsError, UsageError


def parse_data_arg(arg: str) -> tuple[str, float | None]:
    """``PREFIX`` or ``PREFIX:WEIGHT``."""
    prefix, sep, weight = arg.rpartition(":")
    if sep and prefix:
        try:
            w = float(weight)
        except ValueError:
            return arg, None
        if w <= 0:
            raise UsageError(f"--data {arg}: the weight must be positive")
        return prefix, w
    return arg, None


def parse_set_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set train.lr=1e-4 --set model.num_layers=2`` -> {"train": {...}, "model": {...}} (YAML values)."""
    import yaml

    out: dict[str, dict[str, Any]] = {"train": {}, "model": {}}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in out or not name:
            raise UsageError(f"--set {item}: expected train.KEY=VALUE or model.KEY=VALUE")
        out[section][name] = yaml.safe_load(value)
    return out


def load_run_configs(config_path: Path, flag_overrides: dict[str, Any], set_overrides: list[str]):
    """(ModelConfig, TrainConfig) from CONFIG.yaml's model:/train: sections, --set and flags."""
    from parallel.config import ModelConfig, TrainConfig

    data = load_yaml_mapping(config_path)
    unknown = set(data) - {"model", "train"}
    if unknown:
        raise ConfigError(f"{config_path}: unknown section(s) {', '.join(sorted(unknown))} (expected model:, train:)")
    if not isinstance(data.get("model"), dict):
        raise ConfigError(f"{config_path}: needs a 'model:' section with the model's shape")
    sets = parse_set_overrides(set_overrides)
    model_values = {**data["model"], **sets["model"]}
    train_values = {**(data.get("train") or {}), **sets["train"]}
    model = _from_mapping(ModelConfig, model_values, f"{config_path} (model)")
    train = _from_mapping(TrainConfig, train_values, f"{config_path} (train)")
    train = dataclasses.replace(train, **{k: v for k, v in flag_overrides.items() if v is not None})
    return model, train


def _from_mapping(cls, values: dict[str, Any], where: str):
    from rhocli.errors import UsageError as _Usage

    try:
        return config_from_mapping(cls, values, where)
    except _Usage as err:
        raise ConfigError(f"{where}: {err}") from None


def world_from_env() -> int | None:
    ws = os.environ.get("WORLD_SIZE")
    return int(ws) if ws else None


def build_run_spec(model_cfg, train_cfg, config_path: Path, force: bool = False, world_size: int | None = None):
    """Validate everything and return (RunSpec, world_size)."""
    from parallel.config import padded_vocab_size
    from parallel.model import transformer_config
    from parallel.trainer import DatasetRef, RunSpec
    from rhocli.formats.tokens import TokenDataset

    cfg = train_cfg
    # ---- layout
    if cfg.tp < 1 or cfg.pp < 1 or (cfg.dp is not None and cfg.dp < 1):
        raise UsageError("--tp, --pp and --dp must be >= 1")
    if world_size is None:
        world_size = cfg.tp * cfg.pp * (cfg.dp or 1)
    if world_size % (cfg.tp * cfg.pp):
        raise UsageError(f"--tp {cfg.tp} x --pp {cfg.pp} = {cfg.tp * cfg.pp} does not divide the world size {world_size}")
    dp = world_size // (cfg.tp * cfg.pp)
    if cfg.dp is not None and cfg.dp != dp:
        raise UsageError(f"--dp {cfg.dp} does not match world size {world_size} / (tp {cfg.tp} x pp {cfg.pp}) = {dp}")
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise UsageError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of micro_batch_size "
            f"{cfg.micro_batch_size} x data-parallel size {dp}"
        )
    if cfg.seq_length > model_cfg.max_position_embeddings:
        raise UsageError(f"seq_length {cfg.seq_length} exceeds the model's max_position_embeddings {model_cfg.max_position_embeddings}")
    if model_cfg.hidden_size % model_cfg.num_attention_heads:
        raise ConfigError(f"{config_path}: hidden_size must be a multiple of num_attention_heads")
    if model_cfg.num_attention_heads % model_cfg.num_query_groups:
        raise ConfigError(f"{config_path}: num_attention_heads must be a multiple of num_query_groups")
    try:
        import torch

        transformer_config(model_cfg, cfg.tp, cfg.pp, torch.float32)
        padded_vocab_size(1, cfg.tp, model_cfg.make_vocab_size_divisible_by)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {cfg.steps}")
    if not 0 <= cfg.warmup_steps < cfg.steps:
        raise UsageError(f"warmup_steps {cfg.warmup_steps} must be below --steps {cfg.steps} (--set train.warmup_steps=N)")

    # ---- data
    if not cfg.data:
        raise UsageError("no training data: pass --data PREFIX (or train.data in the config)")
    refs, tokenizer_fp, vocab, eod = [], None, None, None
    for arg in cfg.data:
        prefix, weight = parse_data_arg(arg)
        ds = TokenDataset(prefix)
        manifest = ds.manifest or {}
        tok = manifest.get("tokenizer") or {}
        if tokenizer_fp is None:
            tokenizer_fp, vocab, eod = tok.get("fingerprint"), tok.get("vocab_size"), tok.get("eod_id")
        elif tok.get("fingerprint") != tokenizer_fp:
            raise MismatchError(f"--data {prefix}: tokenized with another tokenizer than {cfg.data[0]} ({tok.get('fingerprint')} vs {tokenizer_fp})")
        refs.append(DatasetRef(prefix=str(prefix), weight=weight, fingerprint=ds.fingerprint()))
    if any(r.weight is None for r in refs) and any(r.weight is not None for r in refs):
        raise UsageError("--data: give a weight to every prefix or to none")
    if vocab is None:
        if model_cfg.vocab_size is None:
            raise MismatchError(f"--data {refs[0].prefix}: no rho manifest, so set model.vocab_size in {config_path}")
        vocab = model_cfg.vocab_size
    if eod is None:
        raise MismatchError(f"--data {refs[0].prefix}: the manifest names no end-of-document id (tokenize with --append-eod)")
    if model_cfg.vocab_size is not None and model_cfg.vocab_size < vocab:
        raise MismatchError(
            f"--data {refs[0].prefix}: tokenizer vocabulary {vocab} does not fit the model's vocab_size {model_cfg.vocab_size}"
        )
    vocab = model_cfg.vocab_size or vocab
    model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)

    # ---- run directory and checkpoints
    if not cfg.save:
        raise UsageError("no run directory: pass --save DIR (or train.save in the config)")
    run_dir = Path(cfg.save)
    from parallel import checkpoint as ckpt

    existing = ckpt.latest_step_dir(run_dir) if run_dir.exists() else None
    if existing is not None and not cfg.resume and not force:
        raise OutputExistsError(f"{run_dir}: holds checkpoints (latest {existing.name}); pass --resume to continue or --force to start over")
    if cfg.resume and cfg.init:
        raise UsageError("--resume and --init exclude each other")
    for label, step_dir in (("--resume", existing if cfg.resume else None), ("--init", _init_dir(cfg.init))):
        if step_dir is None:
            continue
        manifest = ckpt.read_manifest(step_dir)
        if manifest.get("tokenizer_fingerprint") and tokenizer_fp and manifest["tokenizer_fingerprint"] != tokenizer_fp:
            raise MismatchError(f"{label} {step_dir}: trained with another tokenizer than --data {refs[0].prefix}")
        if manifest.get("vocab_size") != vocab:
            raise MismatchError(f"{label} {step_dir}: vocab_size {manifest.get('vocab_size')} differs from {vocab}")
        saved_model = dict(manifest.get("model") or {})
        mine = dataclasses.asdict(model_cfg)
        diff = [k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
                if saved_model.get(k) != mine.get(k)]
        if diff:
            raise MismatchError(f"{label} {step_dir}: model shape differs from {config_path} in {', '.join(diff)}")

    scores = _check_scores(cfg, refs)
    masks = _check_masks(cfg, refs)
    eval_refs = _check_eval_data(cfg, tokenizer_fp, refs[0].prefix)

    snapshot = {"model": config_to_dict(model_cfg), "train": config_to_dict(cfg)}
    spec = RunSpec(
        model=model_cfg,
        train=cfg,
        vocab_size=vocab,
        eod_id=int(eod),
        tokenizer_fingerprint=tokenizer_fp,
        datasets=tuple(refs),
        run_dir=str(run_dir),
        config_snapshot=snapshot,
        scores=scores,
        masks=masks,
        eval_datasets=eval_refs,
    )
    return spec, world_size


def _check_eval_data(cfg, tokenizer_fp, first_prefix):
    """Validation datasets of their own: readable, tokenized like the training data."""
    from parallel.trainer import DatasetRef
    from rhocli.formats.tokens import TokenDataset

    out = []
    for arg in cfg.eval_data:
        prefix, weight = parse_data_arg(arg)
        ds = TokenDataset(prefix)
        tok = (ds.manifest or {}).get("tokenizer") or {}
        if tok.get("fingerprint") != tokenizer_fp:
            raise MismatchError(f"--eval-data {prefix}: tokenized with another tokenizer than --data {first_prefix}")
        out.append(DatasetRef(prefix=str(prefix), weight=weight, fingerprint=ds.fingerprint()))
    if any(r.weight is None for r in out) and any(r.weight is not None for r in out):
        raise UsageError("--eval-data: give a weight to every prefix or to none")
    if out and cfg.eval_iters < 1:
        raise UsageError("--eval-data needs eval_iters >= 1 (--set train.eval_iters=N)")
    return tuple(out)


def _check_masks(cfg, refs):
    """Static masks (rho select): one per --data prefix, made for exactly its tokens."""
    from parallel.manifest import read_versioned_json
    from parallel.trainer import DatasetRef
    from rhocli.select import MASK_FORMAT, MASK_FORMAT_VERSION

    if not cfg.masks:
        return ()
    if len(cfg.masks) != len(refs):
        raise UsageError(f"--mask: give one mask store per --data prefix ({len(refs)}), in the same order")
    out = []
    for prefix, ref in zip(cfg.masks, refs):
        path = Path(prefix + ".json")
        if not path.is_file() or not Path(prefix + ".bin").is_file() or not Path(prefix + ".idx").is_file():
            raise MissingInputError(f"--mask {prefix}: mask store not found (PREFIX.bin/.idx/.json from rho select)")
        manifest = read_versioned_json(path, MASK_FORMAT, MASK_FORMAT_VERSION, MismatchError, "mask store")
        made_for = (manifest.get("token_dataset") or {}).get("fingerprint")
        if made_for != ref.fingerprint:
            raise MismatchError(f"--mask {prefix}: masks token dataset {made_for}, not --data {ref.prefix} ({ref.fingerprint})")
        out.append(DatasetRef(prefix=str(prefix), weight=None, fingerprint=manifest.get("fingerprint", "")))
    return tuple(out)


def _check_scores(cfg, refs):
    """Score stores for selective training: one per --data prefix, made from exactly its tokens."""
    from parallel.scores import ScoreStoreError, read_scores_manifest
    from parallel.trainer import DatasetRef

    if cfg.select_ratio is None:
        if cfg.scores:
            raise UsageError("--scores needs --select-ratio (the fraction of tokens to train on)")
        return ()
    if not 0.0 < cfg.select_ratio <= 1.0:
        raise UsageError(f"--select-ratio must be in (0, 1], got {cfg.select_ratio}")
    if not cfg.scores:
        raise UsageError("--select-ratio needs --scores SCORES_PREFIX (from rho score), one per --data")
    if len(cfg.scores) != len(refs):
        raise UsageError(f"--scores: give one score store per --data prefix ({len(refs)}), in the same order")
    out = []
    for prefix, ref in zip(cfg.scores, refs):
        try:
            manifest = read_scores_manifest(prefix)
        except ScoreStoreError as err:
            raise MissingInputError(f"--scores {err}") from None
        made_from = (manifest.get("token_dataset") or {}).get("fingerprint")
        if made_from != ref.fingerprint:
            raise MismatchError(
                f"--scores {prefix}: scores token dataset {made_from}, not --data {ref.prefix} ({ref.fingerprint})"
            )
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).is_file():
                raise MissingInputError(f"--scores {prefix}{ext}: score store file not found")
        out.append(DatasetRef(prefix=str(prefix), weight=None, fingerprint=manifest.get("fingerprint", "")))
    return tuple(out)


def _init_dir(init: str | None):
    if not init:
        return None
    from parallel import checkpoint as ckpt

    try:
        return ckpt.resolve_checkpoint(init)
    except ckpt.CheckpointError as err:
        raise MissingInputError(f"--init {err}") from None


def spec_to_dict(spec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def spec_from_dict(d: dict[str, Any]):
    from parallel.config import ModelConfig, TrainConfig
    from parallel.trainer import DatasetRef, RunSpec

    train = dict(d["train"])
    train["data"] = tuple(train["data"])
    train["scores"] = tuple(train.get("scores") or ())
    train["masks"] = tuple(train.get("masks") or ())
    train["eval_data"] = tuple(train.get("eval_data") or ())
    return RunSpec(
        model=ModelConfig(**d["model"]),
        train=TrainConfig(**train),
        vocab_size=d["vocab_size"],
        eod_id=d["eod_id"],
        tokenizer_fingerprint=d["tokenizer_fingerprint"],
        datasets=tuple(DatasetRef(**r) for r in d["datasets"]),
        run_dir=d["run_dir"],
        config_snapshot=d["config_snapshot"],
        scores=tuple(DatasetRef(**r) for r in d.get("scores") or ()),
        masks=tuple(DatasetRef(**r) for r in d.get("masks") or ()),
        eval_datasets=tuple(DatasetRef(**r) for r in d.get("eval_datasets") or ()),
    )
