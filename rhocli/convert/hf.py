"""``rho convert-hf`` as a library: Hugging Face Llama/Mistral -> rho checkpoint (``import_hf``) and
back (``export_hf``). The name map is the engine's (``parallel.hf``); the files on both sides are
``rhocli.core.formats`` (``hf`` and ``checkpoint``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from rhocli.core.errors import OutputExistsError, UsageError

from rhocli.core.formats.hf import DTYPE_NAMES as DTYPES


def import_hf(hf_dir: str, out: str, force: bool = False) -> dict:
    """Write ``out`` (a rho run directory with step_000000) from the HF model in ``hf_dir``."""
    import torch

    from rhocli.core.megatron_io import import_megatron

    import_megatron()  # before the engine: quietly, torch.compile deferred
    from parallel.checkpoint import save_checkpoint
    from parallel.distributed import destroy_distributed, init_distributed
    from parallel.hf import load_hf_into_model, model_config_from_hf
    from parallel.model import build_model, model_shape
    from rhocli.core.formats.checkpoint import CheckpointStore
    from rhocli.core.formats.hf import open_hf_dir
    from rhocli.core.launch import single_rank_env

    from rhocli.core.formats.staging import StagedDirectory

    hf = open_hf_dir(hf_dir, model_config_from_hf)
    src, cfg = hf.path, hf.model
    dest = Path(out)
    if os.path.lexists(dest) and not force:
        raise OutputExistsError(f"{dest}: already exists; pass --force to replace it")

    single_rank_env()
    init_distributed(1, 1, seed=0)
    try:
        shape = model_shape(cfg, cfg.vocab_size, 1, torch.float32)
        model = build_model(cfg, shape, 1, 1, True, True, weights_loaded=True)  # the HF tensors fill every weight
        load_hf_into_model(model, hf.reader.get, cfg, shape.padded_vocab_size, torch.float32, source=str(src))
        fields = {
            "consumed_samples": 0,
            "layout": {"tp": 1, "pp": 1, "dp": 1},
            "vocab_size": cfg.vocab_size,
            "padded_vocab_size": shape.padded_vocab_size,
            "params_dtype": "float32",
            "tokenizer_fingerprint": hf.tokenizer_fingerprint,
            "eod_id": hf.eos_id,
            "bos_id": hf.bos_id,
            "datasets": [],
            "model": dataclasses.asdict(cfg),
            "config": {"train": {"seq_length": hf.seq_length}},
            "config_hash": None,
            "source": {"huggingface": str(src.resolve()), "architecture": cfg.architecture},
        }
        # the output's lock, a uniquely named staging directory, published whole (formats.staging)
        with StagedDirectory(dest, force) as tmp:
            save_checkpoint(CheckpointStore(tmp), 0, [model], None, fields)
    finally:
        destroy_distributed()
    return {"output": str(dest), "architecture": cfg.architecture, "layers": cfg.num_layers, "vocab": cfg.vocab_size}


def export_hf(ckpt_path: str, out_dir: str, dtype: str = "bf16", tokenizer: str | None = None,
              force: bool = False, max_shard_bytes: int | None = None) -> dict:
    """Write a HF model directory from a rho checkpoint (any TP/PP), streaming tensor by tensor."""
    import torch
    from transformers import GenerationConfig

    from rhocli.core.megatron_io import import_megatron

    import_megatron()  # before the engine: quietly, torch.compile deferred
    from parallel.config import ModelConfig
    from parallel.hf import hf_config, hf_tensors_from_checkpoint
    from rhocli.core.formats import checkpoint as ckpt
    from rhocli.core.formats.hf import MAX_SHARD_BYTES, write_safetensors
    from rhocli.core.formats.staging import StagedDirectory, check_outputs_free
    from rhocli.convert.tokenizer import hf_tokenizer, save_tokenizer, tokenizer_source

    if dtype not in DTYPES:
        raise UsageError(f"--dtype: expected bf16, fp16 or fp32, got {dtype!r}")
    step_dir = ckpt.resolve_checkpoint(ckpt_path)
    manifest = ckpt.read_manifest(step_dir)
    cfg = ModelConfig(**manifest["model"])
    vocab = int(manifest["vocab_size"])
    dest = Path(out_dir)
    check_outputs_free([dest], force)
    tok_source = tokenizer_source(tokenizer, manifest)
    eos, bos = manifest.get("eod_id"), manifest.get("bos_id")
    # built (and checked against the vocabulary) before anything is written
    tok = hf_tokenizer(tok_source, vocab, bos, eos) if tok_source is not None else None
    torch_dtype = getattr(torch, DTYPES[dtype])
    # the output's lock, a uniquely named staging directory, published whole (formats.staging)
    with StagedDirectory(dest, force) as tmp:
        def load(name: str):
            return ckpt.load_model_tensors(step_dir, [name])[name]

        shards = write_safetensors(tmp, hf_tensors_from_checkpoint(load, cfg, vocab, torch_dtype),
                                   max_shard_bytes or MAX_SHARD_BYTES)
        hf_config(cfg, vocab, bos, eos, DTYPES[dtype]).save_pretrained(tmp)
        GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(tmp)
        tok_files = save_tokenizer(tok, tmp) if tok is not None else []
    return {"output": str(dest), "shards": shards, "tokenizer_files": tok_files,
            "tokenizer": str(tok_source) if tok_source is not None else None}
