"""Greedy generation for ``rho eval``, from a Hugging Face model directory (a rho checkpoint reaches
here as the export ``rho convert-hf`` writes).

Two backends with one method, ``generate(prompts, stop, max_new_tokens) -> [Completion]``:

* ``TransformersGenerator`` (default; CPU or one GPU): transformers' own ``generate``, greedy, in batches
  of prompts of similar length padded on the left, stopping at the stop strings (transformers'
  ``stop_strings``) or the end-of-sequence token.
* ``VLLMGenerator`` (GPU, tensor parallel, when vLLM is installed): vLLM's ``LLM.generate`` with
  temperature 0, what math-evaluation-harness uses for the published numbers.

A completion's text ends before its first stop string (vLLM's convention, which the harness's
post-processing expects); ``tokens`` are the generated token ids (the parity tests compare them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from rhocli.core.errors import LoadError, NotAvailableError, UsageError
from rhocli.core.formats.hf import DTYPE_NAMES

BACKENDS = ("transformers", "vllm")


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[int]


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to its first stop string (exclusive)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def precision_for(dtype: str | None, device: str) -> str:
    """``--dtype``, else bf16 on a GPU (the harness loads in half precision) and fp32 on the CPU (no
    fast bf16 GEMM there)."""
    return dtype or ("bf16" if device == "cuda" else "fp32")


def pick_device(device: str) -> str:
    """``auto``: CUDA when there is a GPU, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise NotAvailableError("--device cuda: no CUDA device is visible")
    return device


class TransformersGenerator:
    """Greedy batched generation with transformers (see the module docstring)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str | None = None, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # rho shows its own progress
        self.device = pick_device(device)
        torch_dtype = getattr(torch, DTYPE_NAMES[precision_for(dtype, self.device)])
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as err:
            raise LoadError(f"{model_dir}: no usable tokenizer ({err.__class__.__name__}); "
                            "an export without one needs --tokenizer") from None
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).to(self.device).eval()
        if self.tokenizer.pad_token_id is None:  # pad with EOS (the tokenizer's, else the model's): masked anyway
            eos = self.tokenizer.eos_token_id
            if eos is None:
                eos = self.model.generation_config.eos_token_id
                eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(eos if eos is not None else 0)
        self.batch_size = batch_size

    def generate(self, prompts: list[str], stop: tuple[str, ...], max_new_tokens: int) -> list[Completion]:
        import torch

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
        results: dict[int, Completion] = {}
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            enc = self.tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(self.device)
            with torch.inference_mode():
                out = self.model.generate(
                    **enc, do_sample=False, max_new_tokens=max_new_tokens, stop_strings=list(stop) or None,
                    tokenizer=self.tokenizer, pad_token_id=self.tokenizer.pad_token_id,
                    temperature=None, top_p=None, top_k=None,
                )
            new = out[:, enc["input_ids"].shape[1]:]  # new: [batch, generated] (right-padded after a stop)
            for row, i in enumerate(batch):
                tokens = _until_end(new[row].tolist(), self.model.generation_config.eos_token_id, self.tokenizer.pad_token_id,
                                    stop, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                results[i] = Completion(cut_at_stop(text, stop), tokens)
        return [results[i] for i in range(len(prompts))]


def _until_end(tokens: list[int], eos, pad: int | None, stop: tuple[str, ...] = (),
               decode: Callable[[list[int]], str] | None = None) -> list[int]:
    """The generated ids up to and including the end-of-sequence token (what follows is padding).

    A row that stopped at a stop string is padded to the batch's length. When the padding id is an
    end-of-sequence id (a tokenizer without a pad token pads with EOS), its first padding token looks
    like a generated EOS: the row then ends at the shortest prefix whose text holds a stop string
    (where transformers' stopping criterion ended it), found by bisection over ``decode``."""
    ends = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    first_end = next((i for i, t in enumerate(tokens) if t in ends), None)
    if pad in ends and stop and decode is not None:
        candidate = tokens if first_end is None else tokens[:first_end]
        holds_stop = lambda n: any(s in decode(candidate[:n]) for s in stop)
        if candidate and holds_stop(len(candidate)):
            lo, hi = 1, len(candidate)  # the shortest n with a stop string in the first n tokens' text
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if holds_stop(mid) else (mid + 1, hi)
            return candidate[:lo]
    if first_end is not None:
        return tokens[: first_end + 1]
    # no EOS: a row that stopped at a stop string early is padded to the batch's length
    while tokens and pad is not None and pad not in ends and tokens[-1] == pad:
        tokens = tokens[:-1]
    return tokens


class VLLMGenerator:
    """vLLM, greedy, tensor parallel over ``tensor_parallel`` GPUs (see the module docstring)."""

    def __init__(self, model_dir: str | Path, tensor_parallel: int = 1, dtype: str | None = None):
        try:
            from vllm import LLM
        except ImportError:
            raise NotAvailableError("--backend vllm: vLLM is not installed (pip install vllm; it needs a GPU)") from None
        self.llm = LLM(model=str(model_dir), tensor_parallel_size=tensor_parallel,
                       dtype=DTYPE_NAMES[precision_for(dtype, "cuda")],
                       trust_remote_code=False)

    def generate(self, prompts: list[str], stop: tuple[str, ...], max_new_tokens: int) -> list[Completion]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_new_tokens, stop=list(stop) or None)
        outputs = self.llm.generate(prompts, params)
        return [Completion(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in outputs]
