"""The model ``rho eval`` generates with: a Hugging Face model directory as it is, or a rho checkpoint
(any TP/PP) exported through ``rho convert-hf``'s own path into a temporary directory inside the
eval's output (removed when the eval ends). The export function comes in as an argument: the stage
does not import the convert stage."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Callable, Iterator

from rhocli.core.errors import MissingInputError

EXPORT_NAME = ".rho-model"  # inside the output directory


def model_identity(model: str) -> dict:
    """What names the model in ``settings.json`` (a resumed eval must use the same weights)."""
    from rhocli.core.formats.checkpoint import resolve_checkpoint
    from rhocli.core.formats.hf import is_hf_model_dir

    path = Path(model)
    if is_hf_model_dir(path):
        return {"model": str(path.resolve()), "model_format": "huggingface"}
    if not path.exists():
        raise MissingInputError(f"MODEL {model}: not found")
    step_dir = resolve_checkpoint(path, label="MODEL ")
    return {"model": str(step_dir.resolve()), "model_format": "rho"}


@contextlib.contextmanager
def hf_model_dir(model: str, output: Path, export: Callable[..., dict], dtype: str,
                 tokenizer: str | None) -> Iterator[Path]:
    """A HF directory of ``model`` for the generation backends (see the module docstring)."""
    identity = model_identity(model)
    if identity["model_format"] == "huggingface":
        yield Path(model)
        return
    target = output / EXPORT_NAME
    shutil.rmtree(target, ignore_errors=True)  # a killed eval's leftover
    try:
        result = export(identity["model"], str(target), dtype=dtype, tokenizer=tokenizer, force=True)
        if not result.get("tokenizer_files"):
            raise MissingInputError(f"MODEL {model}: no tokenizer found for this checkpoint (pass --tokenizer FILE)")
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)
