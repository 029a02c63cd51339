"""The worker side of ``rho tokenize``: decode, parse, check and tokenize one job.

Runs in worker processes forked before the main process imports torch or megatron-core, and imports
only light modules itself. Returns tokens already in the dataset's dtype so the main process only copies
bytes.

Error categories (the names users see in the summary and with ``--on-error skip``):
``invalid-utf8``, ``invalid-json``, ``missing-key``, ``non-string``, ``empty``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
from typing import Any

import numpy as np

from rhocli.tokenize.sources import Job

CATEGORIES = ("invalid-utf8", "invalid-json", "missing-key", "non-string", "empty")


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    tokenizer_path: str
    json_keys: tuple[str, ...]
    key_separator: str
    bos_id: int | None  # prepended to every document when set
    eod_id: int | None  # appended to every document when set
    dtype: str  # numpy dtype name of the dataset


@dataclasses.dataclass
class JobResult:
    #: tokens of all accepted documents, concatenated: [sum(lengths)]
    tokens: np.ndarray
    #: tokens per accepted document: [documents]
    lengths: np.ndarray
    #: (line, category, message) of each rejected item, in line order
    issues: list[tuple[int, str, str]]
    text_bytes: int


_tokenizer = None
_options: EncodeOptions | None = None


def init_worker(options: EncodeOptions) -> None:
    """Pool initializer: load the tokenizer once per worker; Ctrl-C and SIGTERM are the main
    process's job (it shuts the pool down)."""
    global _tokenizer, _options
    from rhocli.core.processes import die_with_parent, unblock_signals

    die_with_parent()  # a kill -9 of the main process must not leave workers blocked on their pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's unwinding handler
    unblock_signals()  # forked while the main process kept signals from its new threads
    # Parallelism comes from worker processes; keep HF tokenizers' Rust pool to one thread each.
    os.environ["RAYON_NUM_THREADS"] = "1"
    from rhocli.core.tokenizers import load_tokenizer

    _tokenizer = load_tokenizer(options.tokenizer_path)
    _options = options


def _text_of(kind: str, item: Any, options: EncodeOptions) -> tuple[str | None, str, str]:
    """(text, category, message): text is None when the item is rejected."""
    if kind == "parquet":
        parts = []
        for key, value in zip(options.json_keys, item):
            if not isinstance(value, str):
                what = "null" if value is None else type(value).__name__
                return None, "non-string", f"column '{key}' is {what}, not a string"
            parts.append(value)
        return options.key_separator.join(parts), "", ""
    try:
        text = item.decode("utf-8")
    except UnicodeDecodeError as err:
        line_offset = item.count(b"\n", 0, err.start)
        where = f" (line +{line_offset})" if line_offset else ""
        return None, "invalid-utf8", f"invalid UTF-8 at byte {err.start}{where}"
    if kind == "txt":
        return text, "", ""
    try:
        obj = json.loads(text)
    except ValueError as err:
        return None, "invalid-json", f"invalid JSON ({err})"
    if not isinstance(obj, dict):
        return None, "invalid-json", f"a JSON line must be an object, got {type(obj).__name__}"
    parts = []
    for key in options.json_keys:
        if key not in obj:
            return None, "missing-key", f"missing key '{key}' (keys: {', '.join(map(str, obj)) or 'none'})"
        value = obj[key]
        if not isinstance(value, str):
            what = "null" if value is None else type(value).__name__
            return None, "non-string", f"key '{key}' is {what}, not a string"
        parts.append(value)
    return options.key_separator.join(parts), "", ""


def encode_job(job: Job, options: EncodeOptions | None = None, tokenizer=None) -> JobResult:
    """Tokenize one job. Called in a worker (module state) or directly with ``options``/``tokenizer``."""
    options = options or _options
    tokenizer = tokenizer or _tokenizer
    assert options is not None and tokenizer is not None, "worker not initialised"
    texts: list[str] = []
    issues: list[tuple[int, str, str]] = []
    text_bytes = 0
    for lineno, item in zip(job.linenos, job.items):
        text, category, message = _text_of(job.kind, item, options)
        if text is not None and not text.strip():
            text, category, message = None, "empty", "empty document"
        if text is None:
            issues.append((lineno, category, message))
            continue
        texts.append(text)
        text_bytes += len(item) if isinstance(item, bytes) else len(text.encode("utf-8"))
    ids = tokenizer.encode_batch(texts) if texts else []
    head = [options.bos_id] if options.bos_id is not None else []
    tail = [options.eod_id] if options.eod_id is not None else []
    lengths = np.fromiter((len(x) + len(head) + len(tail) for x in ids), dtype=np.int64, count=len(ids))
    flat = itertools.chain.from_iterable(itertools.chain(head, x, tail) for x in ids)
    tokens = np.fromiter(flat, dtype=options.dtype, count=int(lengths.sum()))
    return JobResult(tokens=tokens, lengths=lengths, issues=issues, text_bytes=text_bytes)
