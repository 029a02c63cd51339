"""What a ``--model`` / ``--reference`` option names: a rho checkpoint or a Hugging Face model directory.

One rule for both (``formats.hf.is_hf_model_dir``): a directory with config.json and no rho checkpoint
is a HF model, read directly by the ranks; anything else must be a rho run or step directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from rhocli.core.errors import MissingInputError


@dataclasses.dataclass
class ModelSource:
    """What ``--model`` or ``--reference`` names: a rho checkpoint (step directory) or a Hugging Face model directory.

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
            from rhocli.core.formats.hf import HFReader

            return {"huggingface": str(self.path.resolve()), "architecture": self.manifest["model"]["architecture"],
                    "fingerprint": self.fingerprint or HFReader(self.path).fingerprint()}
        return {"checkpoint": str(self.path), "step": self.manifest.get("step"),
                "config_hash": self.manifest.get("config_hash"), "fingerprint": self.fingerprint}


def resolve_model(model: str, flag: str, config_from_hf: Callable) -> ModelSource:
    """``flag MODEL``: a rho checkpoint (run or step directory) or a HF Llama/Mistral/Qwen2 directory,
    whose config.json ``config_from_hf`` (the engine's ``parallel.hf.model_config_from_hf``) reads."""
    from rhocli.core.formats import checkpoint as ckpt
    from rhocli.core.formats.hf import is_hf_model_dir, open_hf_dir

    mpath = Path(model)
    if not mpath.exists():
        raise MissingInputError(f"{flag} {model}: not found")
    if not is_hf_model_dir(mpath):
        try:
            step_dir = ckpt.resolve_checkpoint(model, label=f"{flag} ")
        except MissingInputError:
            if (mpath / ckpt.LATEST_NAME).is_file():  # a run directory whose latest step is incomplete
                raise
            raise MissingInputError(f"{flag} {model}: neither a rho checkpoint (no {ckpt.MANIFEST_NAME} or "
                                    f"'{ckpt.LATEST_NAME}') nor a Hugging Face model directory (no config.json)") from None
        manifest = ckpt.read_manifest(step_dir, label=f"{flag} ")
        return ModelSource("rho", step_dir, manifest, ckpt.checkpoint_fingerprint(step_dir))

    hf = open_hf_dir(model, config_from_hf, label=f"{flag} ")
    manifest = {
        "model": dataclasses.asdict(hf.model),
        "vocab_size": hf.model.vocab_size,
        "tokenizer_fingerprint": hf.tokenizer_fingerprint,
        "eod_id": hf.eos_id,
        "config": {"train": {"seq_length": hf.seq_length}},
    }
    return ModelSource("huggingface", hf.path, manifest, None)
