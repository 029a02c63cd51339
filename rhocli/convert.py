"""``rho convert-hf`` as a library: Hugging Face Llama/Mistral -> rho checkpoint (import)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from rhocli.errors import BadInputError, LoadError, MissingInputError, OutputExistsError


def _free_port() -> int:
    from rhocli.launch import free_port

    return free_port()


def import_hf(hf_dir: str, out: str, force: bool = False) -> dict:
    """Write ``out`` (a rho run directory with step_000000) from the HF model in ``hf_dir``."""
    import torch

    from parallel import checkpoint as ckpt
    from parallel.hf import HFConversionError, HFReader, megatron_state_from_hf, model_config_from_hf
    from parallel.model import build_model, model_shape
    from rhocli.tokenizers import file_sha256

    src = Path(hf_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise MissingInputError(f"{config_path}: not found (expected a Hugging Face model directory)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise BadInputError(f"{config_path}: not valid JSON ({err})") from err
    try:
        cfg = model_config_from_hf(config)
        reader = HFReader(src)
    except HFConversionError as err:
        raise BadInputError(f"{src}: {err}") from None
    dest = Path(out)
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest}: already exists; pass --force to replace it")
    tokenizer_fp = None
    for name in ("tokenizer.json", "tokenizer.model"):
        if (src / name).is_file():
            tokenizer_fp = file_sha256((src / name).resolve())
            break
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos

    from parallel.distributed import destroy_distributed, init_distributed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    init_distributed(1, 1, seed=0)
    tmp = dest.parent / f".rho-tmp-{dest.name}"
    try:
        shape = model_shape(cfg, cfg.vocab_size, 1, torch.float32)
        model = build_model(cfg, shape, 1, 1, True, True)
        try:
            state = megatron_state_from_hf(reader.get, cfg, shape.padded_vocab_size, torch.float32)
        except HFConversionError as err:
            raise BadInputError(f"{src}: {err}") from None
        except RuntimeError as err:  # shape mismatch between config and tensors
            raise BadInputError(f"{src}: tensors do not match config.json ({str(err).splitlines()[0]})") from None
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if "_extra_state" not in k]
        if missing or result.unexpected_keys:
            raise BadInputError(f"{src}: tensors do not map onto the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        shutil.rmtree(tmp, ignore_errors=True)
        manifest = {
            "consumed_samples": 0,
            "layout": {"tp": 1, "pp": 1, "dp": 1},
            "vocab_size": cfg.vocab_size,
            "padded_vocab_size": shape.padded_vocab_size,
            "params_dtype": "float32",
            "tokenizer_fingerprint": tokenizer_fp,
            "eod_id": eos,
            "datasets": [],
            "model": dataclasses.asdict(cfg),
            "config": {"train": {"seq_length": min(cfg.max_position_embeddings, 4096)}},
            "config_hash": None,
            "source": {"huggingface": str(src.resolve()), "architecture": cfg.architecture},
        }
        ckpt.save_checkpoint(tmp, 0, [model], None, manifest)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        destroy_distributed()
    return {"output": str(dest), "architecture": cfg.architecture, "layers": cfg.num_layers, "vocab": cfg.vocab_size}
