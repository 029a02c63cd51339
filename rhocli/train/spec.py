"""Turn ``rho train`` options into a validated ``parallel.trainer.RunSpec``, before any worker starts.

Everything a user can get wrong is checked here, in one process, with a one-line error naming the
file or flag: the YAML, the data prefixes and their manifests, tokenizer/vocab agreement between the
datasets, the model and the checkpoint to resume or initialise from, and the parallel layout (the
engine's own checks, ``parallel.layout``, whose errors the CLI words with the flags' names).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from rhocli.core.config import config_from_mapping, config_to_dict, load_yaml_mapping, range_problems
from rhocli.core.errors import ConfigError, MismatchError, MissingInputError, NotAvailableError, OutputExistsError, UsageError
from rhocli.train.selection_inputs import (check_reference, check_scores, is_sample_run,
                                           same_documents, verify_content)


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
    given = {k: v for k, v in flag_overrides.items() if v is not None}
    train = dataclasses.replace(train, **given)
    problems = range_problems(train, given)
    if problems:
        name, problem = problems[0]
        raise UsageError(f"--{name.replace('_', '-')} {problem}")
    return model, train


def _from_mapping(cls, values: dict[str, Any], where: str):
    try:
        return config_from_mapping(cls, values, where)
    except UsageError as err:
        raise ConfigError(f"{where}: {err}") from None


def build_run_spec(model_cfg, train_cfg, config_path: Path, force: bool = False, world_size: int | None = None):
    """Validate everything and return (RunSpec, world_size)."""
    check_metric_sinks(train_cfg)  # first: cheap, and no worker should start only to fail at an import
    from rhocli.core.megatron_io import import_megatron

    import_megatron()  # before the engine: quietly, torch.compile deferred
    import torch

    from parallel.layout import (check_context_parallel, check_sequence_parallel, check_virtual_pipeline,
                                 data_parallel_size, micro_batches_per_step)
    from parallel.model import model_features, transformer_config
    from parallel.trainer import RunSpec
    from rhocli.core.formats import checkpoint as ckpt

    cfg = steps_from_epochs(train_cfg)
    # ---- layout (the engine's checks; their LayoutErrors name the sizes, the CLI names the flags)
    if world_size is None:
        world_size = cfg.tp * cfg.pp * cfg.cp * (cfg.dp or 1)
    dp = data_parallel_size(world_size, cfg.tp, cfg.pp, cfg.dp, cfg.cp)
    num_microbatches = micro_batches_per_step(cfg.global_batch_size, cfg.micro_batch_size, dp)
    check_virtual_pipeline(cfg.virtual_pp, cfg.pp, model_cfg.num_layers, num_microbatches)
    _check_precision_features(cfg, dp)
    _check_recompute(model_cfg, cfg)
    if cfg.seq_length > model_cfg.max_position_embeddings:
        raise UsageError(f"seq_length {cfg.seq_length} exceeds the model's max_position_embeddings {model_cfg.max_position_embeddings}")
    if model_cfg.hidden_size % model_cfg.num_attention_heads:
        raise ConfigError(f"{config_path}: hidden_size must be a multiple of num_attention_heads")
    if model_cfg.num_attention_heads % model_cfg.num_query_groups:
        raise ConfigError(f"{config_path}: num_attention_heads must be a multiple of num_query_groups")
    # parallel.layout's and megatron-core's checks, of the shape and of the training features
    check_sequence_parallel(cfg.sequence_parallel, cfg.tp, cfg.seq_length)
    check_context_parallel(cfg.cp, cfg.seq_length, cfg.tp, cfg.sequence_parallel)
    if cfg.separate_documents and cfg.cp > 1:
        raise NotAvailableError(f"--separate-documents with --cp {cfg.cp}: context parallelism runs plain causal "
                                "attention only")
    if cfg.cp > 1:
        from parallel.model import context_parallel_problem

        problem = context_parallel_problem()
        if problem:
            raise NotAvailableError(f"--cp {cfg.cp}: {problem}")
    transformer_config(model_cfg, cfg.tp, cfg.pp, torch.float32, **model_features(cfg))
    if not 0 <= cfg.warmup_steps < cfg.steps:
        raise UsageError(f"warmup_steps {cfg.warmup_steps} must be below --steps {cfg.steps} (--set train.warmup_steps=N)")
    if cfg.min_lr > cfg.lr:  # megatron's scheduler asserts it; a decay must go down
        raise UsageError(f"--lr {cfg.lr:g} is below min_lr {cfg.min_lr:g}, where the schedule decays to "
                         f"(--set train.min_lr=X)")
    if cfg.lr_decay_style == "wsd":
        from parallel.trainer import wsd_decay_steps

        if wsd_decay_steps(cfg) > cfg.steps - cfg.warmup_steps:
            raise UsageError(f"wsd_decay_steps {wsd_decay_steps(cfg)} must be at most --steps {cfg.steps} minus warmup_steps "
                             f"{cfg.warmup_steps} (--set train.wsd_decay_steps=N)")

    # ---- data
    refs, tokenizer_fp, vocab, eod, bos = resolve_run_data(cfg)
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
    reference = check_reference(cfg, vocab, tokenizer_fp, num_microbatches)

    # ---- run directory and checkpoints
    if not cfg.save:
        raise UsageError("no run directory: pass --save DIR (or train.save in the config)")
    run_dir = Path(cfg.save)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--save {run_dir}: is a file; give a run directory")
    dangling = ckpt.dangling_latest(run_dir)
    if dangling is not None and not force:
        raise MissingInputError(f"{run_dir / ckpt.LATEST_NAME}: names {dangling}, which is not a complete checkpoint; "
                                "nothing to resume from (point latest at a complete step_* directory, or pass --force "
                                "to start over)")
    if (run_dir / ckpt.REPLACED_NAME).is_dir() and not force:
        raise OutputExistsError(f"{run_dir}: a --force run was stopped before its first checkpoint; the run it "
                                f"replaces is kept in {run_dir / ckpt.REPLACED_NAME} (move its files back to continue "
                                "it, or pass --force to replace it again)")
    existing = ckpt.latest_step_dir(run_dir) if run_dir.exists() else None
    if existing is not None and not cfg.resume and not force:
        raise OutputExistsError(f"{run_dir}: holds checkpoints (latest {existing.name}); pass --resume to continue or --force to start over")
    if cfg.resume and force:
        raise UsageError("--resume and --force exclude each other (--resume continues the run, --force replaces it)")
    if cfg.resume and existing is None:
        raise MissingInputError(f"--resume {run_dir}: no checkpoint to resume from (drop --resume to start the run)")
    if cfg.resume:
        done = int(ckpt.read_manifest(existing, label="--resume ")["step"])
        if cfg.steps <= done:
            raise UsageError(f"--resume {run_dir}: the run is at step {done}; --steps {cfg.steps} would end before it "
                             "(give the run's total, greater than its step)")
    if cfg.resume and cfg.init:
        raise UsageError("--resume and --init exclude each other")
    init_dir, init_format = None, "rho"
    if cfg.init:
        hf = _hf_init(cfg.init)
        if hf is not None:  # a Hugging Face model directory: checked against the run here, read by the ranks
            _check_hf_init(hf, model_cfg, vocab, tokenizer_fp, config_path)
            init_dir, init_format = hf.path.resolve(), "huggingface"
        else:
            init_dir = ckpt.resolve_checkpoint(cfg.init, label="--init ")
    for label, step_dir in (("--resume", existing if cfg.resume else None),
                            ("--init", init_dir if init_format == "rho" else None)):
        if step_dir is None:
            continue
        manifest = ckpt.read_manifest(step_dir, label=f"{label} ")
        ckpt.check_checkpoint_files(step_dir, label=f"{label} ")  # every shard there and whole
        if manifest.get("tokenizer_fingerprint") and tokenizer_fp and manifest["tokenizer_fingerprint"] != tokenizer_fp:
            raise MismatchError(f"{label} {step_dir}: trained with another tokenizer than --data {refs[0].prefix}")
        if manifest.get("vocab_size") != vocab:
            raise MismatchError(f"{label} {step_dir}: vocab_size {manifest.get('vocab_size')} differs from {vocab}")
        saved_model = dict(manifest.get("model") or {})
        mine = dataclasses.asdict(model_cfg)
        diff = [k for k in MODEL_STRUCTURE if saved_model.get(k, MODEL_DEFAULTS.get(k)) != mine.get(k)]
        if diff:
            raise MismatchError(f"{label} {step_dir}: model shape differs from {config_path} in {', '.join(diff)}")
        if label == "--resume":
            _same_run(manifest, cfg, refs, step_dir, reference, model_cfg)
            _same_optimizer(manifest, cfg, dp, step_dir)

    scores, entropies = check_scores(cfg, refs, int(eod))
    sample_scores, sample_entropies = (scores[0], entropies[0] if entropies else None) if is_sample_run(cfg) else (None, None)
    if sample_scores is not None:
        scores, entropies = (), ()
    if cfg.trace_selection and cfg.cp > 1:
        raise NotAvailableError(f"--trace-selection with --cp {cfg.cp}: the trace records whole sequences (use --cp 1)")
    masks = _check_masks(cfg.masks, refs, "--mask", "--data")
    eval_refs = _check_eval_data(cfg, tokenizer_fp, refs[0].prefix)
    eval_masks = _check_masks(cfg.eval_masks, eval_refs, "--eval-mask", "--eval-data")
    _one_mask_per_dataset(refs, masks, eval_refs, eval_masks)

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
        entropies=entropies,
        masks=masks,
        eval_datasets=eval_refs,
        eval_masks=eval_masks,
        init_checkpoint=str(init_dir) if init_dir is not None else None,
        init_format=init_format,
        bos_id=bos,
        reference=reference,
        sample_scores=sample_scores,
        sample_entropies=sample_entropies,
    )
    return spec, world_size


def resolve_run_data(cfg):
    """The --data prefixes read: (DatasetRefs, tokenizer fingerprint, vocab, EOD id, BOS id), the
    datasets checked to share one tokenizer and to be weighted all or none."""
    from parallel.trainer import DatasetRef
    from rhocli.core.formats.tokens import TokenDataset

    if not cfg.data:
        raise UsageError("no training data: pass --data PREFIX (or train.data in the config)")
    refs, tokenizer_fp, vocab, eod, bos = [], None, None, None, None
    for arg in cfg.data:
        prefix, weight = parse_data_arg(arg)
        ds = TokenDataset(prefix)
        verify_content(prefix, ds.manifest, "--data ")
        tok = ds.tokenizer
        if tokenizer_fp is None:
            tokenizer_fp, vocab, eod, bos = tok.get("fingerprint"), tok.get("vocab_size"), tok.get("eod_id"), tok.get("bos_id")
        elif tok.get("fingerprint") != tokenizer_fp:
            raise MismatchError(f"--data {prefix}: tokenized with another tokenizer than {cfg.data[0]} ({tok.get('fingerprint')} vs {tokenizer_fp})")
        refs.append(DatasetRef(prefix=str(prefix), weight=weight, fingerprint=ds.fingerprint()))
    if any(r.weight is None for r in refs) and any(r.weight is not None for r in refs):
        raise UsageError("--data: give a weight to every prefix or to none")
    return tuple(refs), tokenizer_fp, vocab, eod, bos


def steps_from_epochs(cfg):
    """``--epochs N``: the steps that read the --data documents N times: ceil(N x samples of one pass /
    global_batch_size), a pass being tokens / seq_length samples (stream packing) or the samples whole
    documents fill (``--pack whole``). megatron's GPTDataset builds as many passes as the steps need."""
    if cfg.epochs is None:
        return cfg
    from parallel.data import whole_document_samples
    from rhocli.core.formats.tokens import TokenDataset

    if not cfg.epochs > 0:
        raise UsageError(f"--epochs {cfg.epochs:g}: expected a number of passes > 0")
    if not cfg.data:
        raise UsageError("no training data: pass --data PREFIX (or train.data in the config)")
    datasets = [TokenDataset(parse_data_arg(arg)[0]) for arg in cfg.data]
    if cfg.pack == "whole":
        samples = sum(whole_document_samples(ds.document_lengths(), cfg.seq_length) for ds in datasets)
    else:
        samples = sum(ds.num_tokens for ds in datasets) / cfg.seq_length
    steps = max(1, math.ceil(cfg.epochs * samples / cfg.global_batch_size))
    return dataclasses.replace(cfg, steps=steps)


#: the model options a checkpoint's weights are shaped by: an --init or --resume must agree on each
MODEL_STRUCTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                   "qkv_bias", "tie_word_embeddings")
#: their values in manifests written before an option existed
MODEL_DEFAULTS = {"qkv_bias": False, "tie_word_embeddings": False}


def _hf_init(init: str):
    """The Hugging Face model directory ``--init`` names (config.json, no rho checkpoint), or None."""
    from parallel.hf import model_config_from_hf
    from rhocli.core.formats.hf import is_hf_model_dir, open_hf_dir

    if not is_hf_model_dir(init):
        return None
    return open_hf_dir(init, model_config_from_hf, label="--init ")


def _check_hf_init(hf, model_cfg, vocab: int, tokenizer_fp: str | None, config_path) -> None:
    """A HF model to start from must have the run's model shape, vocabulary and tokenizer."""
    theirs, mine = dataclasses.asdict(hf.model), dataclasses.asdict(model_cfg)
    diff = [k for k in (*MODEL_STRUCTURE, "rope_theta", "rope_scaling_factor", "norm_epsilon") if theirs.get(k) != mine.get(k)]
    if diff:
        raise MismatchError(f"--init {hf.path}: its config.json differs from {config_path} in "
                            + ", ".join(f"{k} ({theirs.get(k)} vs {mine.get(k)})" for k in diff))
    if hf.model.vocab_size != vocab:
        raise MismatchError(f"--init {hf.path}: vocab_size {hf.model.vocab_size} differs from the run's {vocab} "
                            f"(set model.vocab_size: {hf.model.vocab_size} in {config_path})")
    if hf.tokenizer_fingerprint and tokenizer_fp and hf.tokenizer_fingerprint != tokenizer_fp:
        raise MismatchError(f"--init {hf.path}: its tokenizer is not the one --data was tokenized with")


def _check_eval_data(cfg, tokenizer_fp, first_prefix):
    """Validation datasets of their own: readable, tokenized like the training data."""
    from parallel.trainer import DatasetRef
    from rhocli.core.formats.tokens import TokenDataset

    out = []
    for arg in cfg.eval_data:
        prefix, weight = parse_data_arg(arg)
        ds = TokenDataset(prefix)
        verify_content(prefix, ds.manifest, "--eval-data ")
        if ds.tokenizer.get("fingerprint") != tokenizer_fp:
            raise MismatchError(f"--eval-data {prefix}: tokenized with another tokenizer than --data {first_prefix}")
        out.append(DatasetRef(prefix=str(prefix), weight=weight, fingerprint=ds.fingerprint()))
    if any(r.weight is None for r in out) and any(r.weight is not None for r in out):
        raise UsageError("--eval-data: give a weight to every prefix or to none")
    if out and cfg.eval_iters < 1:
        raise UsageError("--eval-data needs eval_iters >= 1 (--set train.eval_iters=N)")
    return tuple(out)


def _check_masks(masks, refs, flag: str, data_flag: str):
    """Static masks (rho select, rho tokenize --response-key): one per ``data_flag`` prefix, made for
    exactly its tokens (``--mask`` for --data, ``--eval-mask`` for --eval-data)."""
    from parallel.trainer import DatasetRef
    from rhocli.core.formats.masks import read_mask_manifest

    if not masks:
        return ()
    if not refs:
        raise UsageError(f"{flag} needs {data_flag} (one mask store per {data_flag} prefix)")
    if len(masks) != len(refs):
        raise UsageError(f"{flag}: give one mask store per {data_flag} prefix ({len(refs)}), in the same order")
    out = []
    for prefix, ref in zip(masks, refs):
        manifest = read_mask_manifest(prefix, label=f"{flag} ")
        verify_content(prefix, manifest, f"{flag} ")
        if manifest.get("kept") == 0:
            raise UsageError(f"{flag} {prefix}: keeps no token (kept 0 of {manifest.get('tokens')}); nothing to learn from")
        made_for = (manifest.get("token_dataset") or {}).get("fingerprint")
        if made_for != ref.fingerprint:
            raise MismatchError(f"{flag} {prefix}: masks token dataset {made_for}, not {data_flag} {ref.prefix} ({ref.fingerprint})")
        same_documents(prefix, ref.prefix, flag, data_flag)
        out.append(DatasetRef(prefix=str(prefix), weight=None, fingerprint=manifest.get("fingerprint", "")))
    return tuple(out)


def _one_mask_per_dataset(refs, masks, eval_refs, eval_masks) -> None:
    """A dataset named by both --data and --eval-data is read with one mask (megatron's datasets are
    keyed by their path): the two flags must agree on it."""
    train = {r.prefix: (m.prefix if m else None) for r, m in zip(refs, masks or [None] * len(refs))}
    for ref, mask in zip(eval_refs, eval_masks or [None] * len(eval_refs)):
        mine = mask.prefix if mask else None
        if ref.prefix in train and train[ref.prefix] != mine:
            raise UsageError(f"--eval-data {ref.prefix} is also --data, with mask {train[ref.prefix]} there and {mine} "
                             "here: give it the same mask in both (--mask, --eval-mask)")


#: what a resumed run may change: how long it runs, how it is laid out and logged (``tp``/``pp``/``dp``
#: reshard; ``init`` only acts at step 0). Every other option is the run's, and a resume keeps it.
RESUME_MAY_CHANGE = frozenset({"steps", "stop_after", "save_interval", "eval_interval", "log_interval", "checkpoint",
                               "tp", "pp", "dp", "cp", "init", "resume", "save", "data_cache", "data", "eval_data",
                               "eval_masks", "scores", "masks",
                               # compared by content: the stores' and the reference's fingerprints (``_same_run``)
                               "reference",
                               # what is recorded, not what is trained
                               "trace_selection",
                               # memory/speed features: the same math, so a resume may switch them
                               "recompute", "recompute_method", "recompute_num_layers", "recompute_modules",
                               "sequence_parallel", "virtual_pp", "overlap_grad_reduce", "overlap_param_gather",
                               # compared by what it resolves to (``_same_optimizer``)
                               "distributed_optimizer",
                               # where checkpoints and metrics go, not what is trained
                               "async_save", "tensorboard", "wandb_project", "peak_tflops"})


#: the optional metric sinks: (config key, flag, package = the pyproject extra that installs it)
METRIC_SINKS = (("tensorboard", "--tensorboard", "tensorboard"), ("wandb_project", "--wandb-project", "wandb"))


def check_metric_sinks(cfg) -> None:
    """--tensorboard / --wandb-project need an optional package; without it a worker would fail at
    its import after the process group is up, so say it here (find_spec: nothing is imported)."""
    import importlib.util

    for key, flag, package in METRIC_SINKS:
        if getattr(cfg, key) and importlib.util.find_spec(package) is None:
            raise NotAvailableError(f"{flag} needs the {package} package: pip install 'rho[{package}]' (or pip install {package})")
    # W&B refuses these in a project name, and only when the run is already training
    if cfg.wandb_project and any(c in cfg.wandb_project for c in "/\\#?%:"):
        raise UsageError(f"--wandb-project {cfg.wandb_project}: a W&B project name cannot contain / \\ # ? % :")


def _check_precision_features(cfg, dp: int) -> None:
    """Feature combinations megatron-core refuses deep inside a worker, said up front."""
    import torch

    from parallel.trainer import data_parallel_features

    features = data_parallel_features(cfg, dp, torch.cuda.is_available())
    if features["use_distributed_optimizer"] and cfg.optimizer != "adam":
        raise UsageError("--distributed-optimizer shards Adam's state; megatron-core checkpoints no other "
                         "optimizer's (set train.optimizer=adam, or drop --distributed-optimizer)")
    if cfg.overlap_param_gather and not features["use_distributed_optimizer"]:
        raise UsageError("train.overlap_param_gather needs the distributed optimizer (--distributed-optimizer)")
    if cfg.overlap_param_gather and not features["overlap_grad_reduce"]:
        raise UsageError("train.overlap_param_gather needs train.overlap_grad_reduce (megatron-core's DDP)")
    if cfg.loss_scale is not None and cfg.precision != "fp16":
        raise UsageError(f"train.loss_scale applies to precision fp16, not {cfg.precision}")


def _check_recompute(model_cfg, cfg) -> None:
    """Recompute settings megatron-core 0.16 fails on inside a worker (an IndexError, a NameError)."""
    import importlib.util

    if cfg.recompute == "full" and cfg.recompute_method == "uniform":
        chunk_layers = model_cfg.num_layers // (cfg.pp * (cfg.virtual_pp or 1))
        if chunk_layers % cfg.recompute_num_layers:
            raise UsageError(f"train.recompute_num_layers {cfg.recompute_num_layers} must divide the {chunk_layers} layers "
                             "each pipeline stage runs at a time (uniform recompute checkpoints them in groups of that size)")
    if (cfg.recompute == "selective" and "layernorm" in cfg.recompute_modules
            and importlib.util.find_spec("transformer_engine") is None):
        raise NotAvailableError("train.recompute_modules layernorm needs Transformer Engine in megatron-core (not installed)")


def _same_run(manifest: dict, cfg, refs, step_dir: Path, reference=None, model_cfg=None) -> None:
    """--resume continues a run exactly, so it refuses options that would make it another run (a new
    --lr, other data, another RoPE base or norm epsilon: every model option, not only the shape); the
    datasets are compared by content, not by the paths given."""
    saved_train = ((manifest.get("config") or {}).get("train")) or {}
    mine = config_to_dict(cfg)
    changed = [f"{k} was {saved_train[k]!r}, now {mine[k]!r}" for k in sorted(mine)
               if k not in RESUME_MAY_CHANGE and k in saved_train and saved_train[k] != mine[k]]
    if model_cfg is not None:
        saved_model, my_model = manifest.get("model") or {}, dataclasses.asdict(model_cfg)
        changed += [f"model.{k} was {saved_model[k]!r}, now {my_model[k]!r}" for k in sorted(my_model)
                    if k in saved_model and saved_model[k] != my_model[k]]
    saved_data = [(d.get("fingerprint"), d.get("weight")) for d in manifest.get("datasets") or []]
    if saved_data and saved_data != [(r.fingerprint, r.weight) for r in refs]:
        changed.append("--data: other datasets or weights than the run was trained on")
    saved_scores = [s.get("fingerprint") for s in manifest.get("scores") or []]
    if manifest.get("sample_scores"):
        saved_scores = [manifest["sample_scores"].get("fingerprint")]
    if saved_scores and cfg.scores and saved_scores != [_store_fingerprint(p) for p in cfg.scores]:
        changed.append("--scores: other score stores than the run selected with")
    saved_reference = (manifest.get("reference") or {}).get("fingerprint")
    if saved_reference and reference is not None and saved_reference != reference.fingerprint:
        changed.append(f"--reference: another model ({reference.fingerprint[:19]}…) than the run selected with "
                       f"({saved_reference[:19]}…)")
    if changed:
        raise MismatchError(f"--resume {step_dir}: the run's options differ ({'; '.join(changed)}); a resume continues "
                            "the run exactly, so give its options (or start a new run with --init)")


def _same_optimizer(manifest: dict, cfg, dp: int, step_dir: Path) -> None:
    """A checkpoint's optimizer state loads into the same kind of optimizer only; a distributed one's
    (saved dp_reshardable, Megatron-LM's default) into another data-parallel size, not another TP/PP."""
    import torch

    from parallel.trainer import data_parallel_features

    saved = manifest.get("optimizer")
    mine = "distributed" if data_parallel_features(cfg, dp, torch.cuda.is_available())["use_distributed_optimizer"] else "fp32"
    if saved and saved != mine:
        flag = "--distributed-optimizer" if saved == "distributed" else "--no-distributed-optimizer"
        raise MismatchError(f"--resume {step_dir}: saved with the {saved} optimizer; its state loads only into the same "
                            f"kind (pass {flag}), or start a new run from its weights with --init")
    layout = manifest.get("layout") or {}
    if saved == "distributed" and (layout.get("tp"), layout.get("pp")) != (cfg.tp, cfg.pp):
        raise MismatchError(f"--resume {step_dir}: the distributed optimizer's state was saved at tp {layout.get('tp')} "
                            f"pp {layout.get('pp')}; it resumes at another --dp, not another --tp/--pp (or start a "
                            "new run from its weights with --init)")


def _store_fingerprint(prefix: str) -> str | None:
    from rhocli.core.formats.sample_scores import is_sample_store, read_sample_manifest
    from rhocli.core.formats.scores import read_scores_manifest

    if is_sample_store(prefix):
        return read_sample_manifest(prefix, label="--scores ").get("fingerprint")
    return read_scores_manifest(prefix, label="--scores ").get("fingerprint")


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
    train["eval_masks"] = tuple(train.get("eval_masks") or ())
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
        entropies=tuple(DatasetRef(**r) for r in d.get("entropies") or ()),
        masks=tuple(DatasetRef(**r) for r in d.get("masks") or ()),
        eval_datasets=tuple(DatasetRef(**r) for r in d.get("eval_datasets") or ()),
        eval_masks=tuple(DatasetRef(**r) for r in d.get("eval_masks") or ()),
        init_checkpoint=d.get("init_checkpoint"),
        init_format=d.get("init_format", "rho"),
        bos_id=d.get("bos_id"),
        reference=_reference_from_dict(d.get("reference")),
        sample_scores=DatasetRef(**d["sample_scores"]) if d.get("sample_scores") else None,
        sample_entropies=DatasetRef(**d["sample_entropies"]) if d.get("sample_entropies") else None,
    )


def _reference_from_dict(d):
    if not d:
        return None
    from parallel.config import ModelConfig
    from parallel.reference import ReferenceSpec

    return ReferenceSpec(**{**d, "model": ModelConfig(**d["model"])})


def run_plan(spec, world: int) -> dict[str, Any]:
    """What ``--dry-run`` shows, as data: the layout, the model, the data, the batch, and the memory
    estimate per rank (``parallel.memory``; sized for CUDA devices, where such a run is meant to go:
    ``precision: auto`` counts as bf16 and the distributed optimizer is on by default for DP > 1)."""
    import torch

    from parallel.layout import data_parallel_size, micro_batches_per_step
    from parallel.memory import estimate_memory
    from parallel.model import count_parameters, model_shape

    cfg = spec.train
    shape = model_shape(spec.model, spec.vocab_size, cfg.tp, torch.float32)
    dp = data_parallel_size(world, cfg.tp, cfg.pp, cp=cfg.cp)
    memory = estimate_memory(spec.model, cfg, spec.vocab_size, dp, on_gpu=True,
                             reference=spec.reference.model if spec.reference is not None else None)
    return {
        "world_size": world, "tp": cfg.tp, "pp": cfg.pp, "cp": cfg.cp, "dp": dp,
        "architecture": spec.model.architecture, "parameters": count_parameters(spec.model, spec.vocab_size),
        "num_layers": spec.model.num_layers, "vocab_size": shape.vocab_size, "padded_vocab_size": shape.padded_vocab_size,
        "datasets": [dataclasses.asdict(d) for d in spec.datasets],
        "eval_datasets": [dataclasses.asdict(d) for d in spec.eval_datasets],
        "global_batch_size": cfg.global_batch_size, "seq_length": cfg.seq_length, "micro_batch_size": cfg.micro_batch_size,
        "num_microbatches": micro_batches_per_step(cfg.global_batch_size, cfg.micro_batch_size, dp),
        "steps": cfg.steps, "run_dir": spec.run_dir, "resume": cfg.resume, "config_hash": spec.config_hash(),
        "memory": {**dataclasses.asdict(memory), "total": memory.total},
        "reference": ({"source": spec.reference_source, "path": spec.reference.path if spec.reference else
                       (spec.sample_scores.prefix if spec.sample_scores else ", ".join(s.prefix for s in spec.scores))}
                      if spec.reference_source else None),
    }


def prepare_run_dir(spec, force: bool) -> None:
    """Rank 0, before the ranks start: the run directory with its resolved config. ``--force`` (not
    resuming) sets the previous run aside (``CheckpointStore.set_aside``): it is removed when the new
    run publishes its first checkpoint, and put back if the new run ends before (``finish_run_dir``)."""
    import os
    import shutil

    from rhocli.core.config import write_resolved_config
    from rhocli.core.formats.checkpoint import CheckpointStore

    if int(os.environ.get("RANK", 0)) != 0:
        return
    run_dir = Path(spec.run_dir)
    store = CheckpointStore(run_dir)
    if force and not spec.train.resume:
        if store.replaced_dir.is_dir():  # a replacement stopped before its checkpoint: its files go
            for entry in store._run_entries():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        else:
            store.set_aside()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(spec.train, run_dir / "train.config.yaml", stage="train")


def finish_run_dir(spec) -> bool:
    """Rank 0, after the ranks ended (however): a --force replacement without a checkpoint puts the
    replaced run back. Returns whether it did."""
    import os

    from rhocli.core.formats.checkpoint import CheckpointStore

    return int(os.environ.get("RANK", 0)) == 0 and CheckpointStore(spec.run_dir).put_back()
