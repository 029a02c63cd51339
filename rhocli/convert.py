"""``rho convert-hf`` as a library: Hugging Face Llama/Mistral -> rho checkpoint (``import_hf``) and
back (``export_hf``). ``read_hf_dir`` checks a HF model directory; ``rho score --model HF_DIR`` uses
it too (and then loads the tensors on each rank without converting)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from rhocli.errors import BadInputError, LoadError, MissingInputError, OutputExistsError


#: the training sequence length recorded for an imported HF model (its default scoring window)
HF_DEFAULT_SEQ_LENGTH = 4096


@dataclasses.dataclass
class HFModelDir:
    """A Hugging Face Llama/Mistral directory rho can read (config checked, weight files found)."""

    path: Path
    config: dict
    model: "object"  # parallel.config.ModelConfig
    reader: "object"  # parallel.hf.HFReader
    tokenizer_fingerprint: str | None
    eos_id: int | None

    @property
    def seq_length(self) -> int:
        return min(self.model.max_position_embeddings, HF_DEFAULT_SEQ_LENGTH)


def read_hf_dir(hf_dir: str, label: str = "") -> HFModelDir:
    """Check a HF model directory; errors are one line, prefixed with ``label`` (e.g. ``"--model "``)."""
    from parallel.hf import HFConversionError, HFReader, model_config_from_hf
    from rhocli.tokenizers import file_sha256

    src = Path(hf_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise MissingInputError(f"{label}{config_path}: not found (expected a Hugging Face model directory)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise BadInputError(f"{label}{config_path}: not valid JSON ({err})") from err
    try:
        if not isinstance(config, dict):
            raise HFConversionError("config.json is not a JSON object")
        cfg = model_config_from_hf(config)
        reader = HFReader(src)
    except (HFConversionError, KeyError, TypeError, ValueError) as err:
        detail = f"config.json has no {err}" if isinstance(err, KeyError) else str(err)
        raise BadInputError(f"{label}{src}: {detail}") from None
    tokenizer_fp = None
    for name in ("tokenizer.json", "tokenizer.model"):
        if (src / name).is_file():
            tokenizer_fp = file_sha256((src / name).resolve())
            break
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    return HFModelDir(src, config, cfg, reader, tokenizer_fp, eos)


def import_hf(hf_dir: str, out: str, force: bool = False) -> dict:
    """Write ``out`` (a rho run directory with step_000000) from the HF model in ``hf_dir``."""
    import torch

    from parallel import checkpoint as ckpt
    from parallel.hf import HFConversionError, megatron_state_from_hf
    from parallel.model import build_model, model_shape

    hf = read_hf_dir(hf_dir)
    src, cfg, reader, tokenizer_fp, eos = hf.path, hf.model, hf.reader, hf.tokenizer_fingerprint, hf.eos_id
    dest = Path(out)
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest}: already exists; pass --force to replace it")

    from parallel.distributed import destroy_distributed, init_distributed
    from rhocli.launch import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
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
            "config": {"train": {"seq_length": hf.seq_length}},
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


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MAX_SHARD_BYTES = 5 * 1024**3


def export_hf(ckpt_path: str, out_dir: str, dtype: str = "bf16", tokenizer: str | None = None,
              force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write a HF model directory from a rho checkpoint (any TP/PP), streaming tensor by tensor."""
    import torch
    from safetensors.torch import save_file

    from parallel import checkpoint as ckpt
    from parallel.config import ModelConfig
    from parallel.hf import hf_config, hf_tensors_from_checkpoint
    from rhocli.errors import UsageError
    from rhocli.formats.atomic import check_outputs_free

    if dtype not in DTYPES:
        raise UsageError(f"--dtype: expected bf16, fp16 or fp32, got {dtype!r}")
    try:
        step_dir = ckpt.resolve_checkpoint(ckpt_path)
        manifest = ckpt.read_manifest(step_dir)
    except ckpt.CheckpointError as err:
        raise MissingInputError(str(err)) from None
    cfg = ModelConfig(**manifest["model"])
    vocab = int(manifest["vocab_size"])
    dest = Path(out_dir)
    check_outputs_free([dest], force)
    tok_files = _tokenizer_files(tokenizer, manifest)
    torch_dtype = getattr(torch, DTYPES[dtype])
    tmp = dest.parent / f".rho-tmp-{dest.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards: list[dict] = []
        current: dict = {}
        size = 0
        for name, tensor in hf_tensors_from_checkpoint(step_dir, cfg, vocab, torch_dtype):
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                _write_shard(tmp, len(shards), current, save_file)
                current, size = {}, 0
            current[name] = tensor
            size += nbytes
        shards.append(current)
        names = _write_shard(tmp, len(shards), current, save_file, last=True, total=len(shards))
        if len(shards) > 1:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                for name in shard:
                    weight_map[name] = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        del names
        eos = manifest.get("eod_id")
        bos = manifest.get("bos_id")
        config = hf_config(cfg, vocab, bos, eos, DTYPES[dtype])
        config.save_pretrained(tmp)
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(tmp)
        for f in tok_files:
            shutil.copy(f, tmp / f.name)
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(dest), "shards": len(shards), "tokenizer_files": [f.name for f in tok_files]}


def _write_shard(directory: Path, index: int, tensors: dict, save_file, last: bool = False, total: int = 0):
    """Shards are written as they fill, so memory stays near one shard; a single shard is model.safetensors."""
    if last and total == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return list(tensors)
    # names are fixed once the total is known: write as model-XXXXX.tmp, rename at the end
    save_file(tensors, str(directory / f"shard-{index:05d}.tmp"), metadata={"format": "pt"})
    tensors_names = list(tensors)
    if last:
        for i in range(1, total + 1):
            os.replace(directory / f"shard-{i:05d}.tmp", directory / f"model-{i:05d}-of-{total:05d}.safetensors")
    return tensors_names


def _tokenizer_files(tokenizer: str | None, manifest: dict) -> list[Path]:
    """Tokenizer files to ship: from --tokenizer, else from the HF model the checkpoint came from."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
    if tokenizer:
        p = Path(tokenizer)
        if not p.exists():
            raise MissingInputError(f"--tokenizer {p}: not found")
        if p.is_file():
            return [p]
        return [p / n for n in names if (p / n).is_file()]
    source = (manifest.get("source") or {}).get("huggingface")
    if source and Path(source).is_dir():
        return [Path(source) / n for n in names if (Path(source) / n).is_file()]
    return []
