"""A Hugging Face model directory on disk: ``config.json``, weights (``model.safetensors``, sharded
with ``model.safetensors.index.json``, or PyTorch ``.bin``), tokenizer files.

``open_hf_dir`` checks a directory and returns an ``HFModelDir`` (its config, a tensor reader, the
tokenizer's fingerprint); mapping the config onto rho's model (and refusing what rho does not build)
is the engine's, passed in as ``parse_config``. ``write_safetensors`` is the writer of the weights,
sharded as transformers does. How HF tensor names map onto megatron's is ``parallel.hf``'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from rhocli.core.errors import BadInputError, MissingInputError

#: the training sequence length recorded for an imported HF model (its default scoring window)
HF_DEFAULT_SEQ_LENGTH = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
MAX_SHARD_BYTES = 5 * 1024**3


#: rho's precision flags -> torch / config.json dtype names (rho convert-hf --dtype, rho eval --dtype)
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def is_hf_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model directory rather than a rho checkpoint: it has a
    ``config.json`` and neither a rho step's manifest nor a run's ``latest`` (a rho directory wins
    over a config.json beside it). The one rule ``--init``, ``--model`` and ``rho eval MODEL`` use."""
    from rhocli.core.formats.checkpoint import LATEST_NAME, MANIFEST_NAME

    path = Path(path)
    return (path / "config.json").is_file() and not (path / MANIFEST_NAME).is_file() and not (path / LATEST_NAME).is_file()


class HFReader:
    """Tensor-by-tensor access to a HF checkpoint: model.safetensors (sharded or not) or .bin."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._files: dict[str, Path] = {}
        self._bins: dict[Path, dict] = {}
        st_index = self.dir / "model.safetensors.index.json"
        bin_index = self.dir / "pytorch_model.bin.index.json"
        if st_index.is_file() or bin_index.is_file():
            index_file = st_index if st_index.is_file() else bin_index
            try:
                index = json.loads(index_file.read_text())
                self._files = {k: self.dir / f for k, f in index["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise BadInputError(f"{index_file}: not a weight index (a JSON object with a weight_map)") from None
            for path in sorted(set(self._files.values())):
                if not path.is_file():
                    raise MissingInputError(f"{path}: missing (named by {index_file.name})")
        elif (self.dir / "model.safetensors").is_file():
            self._files = {k: self.dir / "model.safetensors" for k in self._safetensor_keys(self.dir / "model.safetensors")}
        elif (self.dir / "pytorch_model.bin").is_file():
            self._files = {k: self.dir / "pytorch_model.bin" for k in self._bin(self.dir / "pytorch_model.bin")}
        else:
            raise BadInputError(f"{self.dir}: no model.safetensors or pytorch_model.bin")

    @staticmethod
    def _safetensor_keys(path: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as err:  # truncated / corrupt header
            raise BadInputError(f"{path}: unreadable safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err

    def _bin(self, path: Path) -> dict:
        if path not in self._bins:
            import torch

            try:
                self._bins[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:
                raise BadInputError(f"{path}: unreadable PyTorch checkpoint ({type(err).__name__})") from err
        return self._bins[path]

    def names(self) -> list[str]:
        return list(self._files)

    def files(self) -> list[Path]:
        """The weight files (and index) this model is read from."""
        files = sorted(set(self._files.values()))
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (self.dir / index).is_file():
                files.insert(0, self.dir / index)
        return files

    def fingerprint(self) -> str:
        """sha256 over config.json and every weight file's name and content (the model's identity)."""
        from rhocli.core.fingerprint import sha256_files

        return sha256_files([self.dir / "config.json", *self.files()], with_names=True)

    def get(self, name: str):
        """The tensor ``name`` (a torch.Tensor)."""
        if name not in self._files:
            raise BadInputError(f"{self.dir}: tensor {name} is missing")
        path = self._files[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor(name)
            except Exception as err:
                raise BadInputError(f"{path}: cannot read tensor {name} (truncated or corrupt file?)") from err
        return self._bin(path)[name]


@dataclasses.dataclass
class HFModelDir:
    """A Hugging Face model directory rho can read (config checked, weight files found)."""

    path: Path
    config: dict
    #: rho's model config (``parallel.config.ModelConfig``), from ``parse_config(config)``
    model: Any
    reader: HFReader
    tokenizer_fingerprint: str | None
    eos_id: int | None
    bos_id: int | None

    @property
    def seq_length(self) -> int:
        return min(self.model.max_position_embeddings, HF_DEFAULT_SEQ_LENGTH)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]


def _token_id(config: dict, key: str) -> int | None:
    value = config.get(key)
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def open_hf_dir(hf_dir: str | Path, parse_config: Callable[[dict], Any], label: str = "") -> HFModelDir:
    """Check a HF model directory; errors are one line, prefixed with ``label`` (e.g. ``"--model "``).
    ``parse_config`` maps config.json onto rho's model config and raises ValueError (with the reason)
    for what rho does not build, KeyError for a missing key."""
    from rhocli.core.fingerprint import file_sha256

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
            raise ValueError("config.json is not a JSON object")
        model = parse_config(config)
        reader = HFReader(src)
    except BadInputError as err:
        raise BadInputError(f"{label}{err}") from None
    except (KeyError, TypeError, ValueError) as err:
        detail = f"config.json has no {err}" if isinstance(err, KeyError) else str(err)
        raise BadInputError(f"{label}{src}: {detail}") from None
    tokenizer_fp = None
    for name in ("tokenizer.json", "tokenizer.model"):
        if (src / name).is_file():
            tokenizer_fp = file_sha256((src / name).resolve())
            break
    return HFModelDir(src, config, model, reader, tokenizer_fp, _token_id(config, "eos_token_id"),
                      _token_id(config, "bos_token_id"))


def write_safetensors(directory: Path, tensors: Iterable[tuple[str, Any]], max_shard_bytes: int = MAX_SHARD_BYTES) -> int:
    """Write (name, tensor) pairs as ``model.safetensors``, or as ``model-XXXXX-of-NNNNN.safetensors``
    shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json`` (transformers' layout).
    Shards are written as they fill, so memory stays near one shard. Returns the number of shards."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    current: dict = {}
    size = total = 0

    def flush() -> None:
        shards.append(list(current))
        # names are fixed once the count is known: written as shard-XXXXX.tmp, renamed at the end
        save_file(current, str(directory / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        os.replace(directory / "shard-00001.tmp", directory / "model.safetensors")
        return 1
    weight_map = {}
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(directory / f"shard-{i:05d}.tmp", directory / final)
        weight_map.update({name: final for name in names})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return len(shards)
