"""The worker side of ``rho tokenize``: decode, parse, check and tokenize one job.

Runs in worker processes forked before the main process imports torch or megatron-core, and imports
only light modules itself. Returns tokens already in the dataset's dtype so the main process only copies
bytes.

Error categories (the names users see in the summary and with ``--on-error skip``):
``invalid-utf8``, ``invalid-json``, ``missing-key``, ``non-string``, ``empty``; for instruction data
(``rhocli.tokenize.instruct``) also ``bad-messages``, ``empty-response`` (nothing to train on) and
``too-long`` (longer than ``--seq-length``: training would cut it).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
from typing import Any

import numpy as np

from rhocli.tokenize.instruct import InstructError, InstructOptions, encode_example, load_template
from rhocli.tokenize.sources import Job

CATEGORIES = ("invalid-utf8", "invalid-json", "missing-key", "non-string", "empty")
INSTRUCT_CATEGORIES = CATEGORIES[:-1] + ("bad-messages", "empty-response", "too-long")


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    tokenizer_path: str
    json_keys: tuple[str, ...]
    key_separator: str
    bos_id: int | None  # prepended to every document when set
    eod_id: int | None  # appended to every document when set
    dtype: str  # numpy dtype name of the dataset
    instruct: InstructOptions | None = None  # instruction data: a trained-token mask per document
    max_tokens: int | None = None  # instruction data: longer examples are rejected (too-long)


@dataclasses.dataclass
class JobResult:
    #: tokens of all accepted documents, concatenated: [sum(lengths)]
    tokens: np.ndarray
    #: tokens per accepted document: [documents]
    lengths: np.ndarray
    #: (line, category, message) of each rejected item, in line order
    issues: list[tuple[int, str, str]]
    text_bytes: int
    #: instruction data: whether each token is trained, [sum(lengths)] bool; None otherwise
    mask: np.ndarray | None = None


_tokenizer = None
_options: EncodeOptions | None = None
_template = None


def init_worker(options: EncodeOptions) -> None:
    """Pool initializer: load the tokenizer once per worker; Ctrl-C and SIGTERM are the main
    process's job (it shuts the pool down)."""
    global _tokenizer, _options, _template
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
    _template = load_template(options.instruct.template, _tokenizer) if options.instruct else None


def _record_of(kind: str, item: Any) -> tuple[Any, str, str]:
    """(record, category, message): the decoded item (text of a .txt document, a JSON object, the
    parquet row's columns as a tuple); record is None when the item is rejected."""
    if kind == "parquet":
        return tuple(item), "", ""
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
    return obj, "", ""


def _text_of(kind: str, item: Any, options: EncodeOptions) -> tuple[str | None, str, str]:
    """(text, category, message): text is None when the item is rejected."""
    obj, category, message = _record_of(kind, item)
    if obj is None or kind == "txt":
        return obj, category, message
    if kind == "parquet":
        parts = []
        for key, value in zip(options.json_keys, obj):
            if not isinstance(value, str):
                what = "null" if value is None else type(value).__name__
                return None, "non-string", f"column '{key}' is {what}, not a string"
            parts.append(value)
        return options.key_separator.join(parts), "", ""
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
    if options.instruct is not None:
        template = _template if options is _options else load_template(options.instruct.template, tokenizer)
        return _encode_instruct_job(job, options, tokenizer, template)
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


def _encode_instruct_job(job: Job, options: EncodeOptions, tokenizer, template) -> JobResult:
    """Instruction records: each rendered, tokenized whole, with its trained-token mask. The BOS id
    is never trained; the EOD id is, after a conversation that ends with the assistant."""
    ids_parts: list[list[int]] = []
    mask_parts: list[np.ndarray] = []
    issues: list[tuple[int, str, str]] = []
    text_bytes = 0
    head = [options.bos_id] if options.bos_id is not None else []
    for lineno, item in zip(job.linenos, job.items):
        record, category, message = _record_of(job.kind, item)
        if record is None:
            issues.append((lineno, category, message))
            continue
        try:
            ids, mask, ends_with_assistant = encode_example(record, options.instruct, template, tokenizer)
        except InstructError as err:
            issues.append((lineno, err.category, str(err)))
            continue
        tail = [options.eod_id] if options.eod_id is not None else []
        ids = head + ids + tail
        mask = np.concatenate([np.zeros(len(head), bool), mask, np.full(len(tail), ends_with_assistant)])
        if not mask.any():
            issues.append((lineno, "empty-response", "no token of the response is left to train on"))
            continue
        if options.max_tokens is not None and len(ids) > options.max_tokens:
            issues.append((lineno, "too-long", f"the example is {len(ids)} tokens, longer than --seq-length "
                                               f"{options.max_tokens} (training would cut its response)"))
            continue
        ids_parts.append(ids)
        mask_parts.append(mask)
        text_bytes += len(item) if isinstance(item, bytes) else sum(len(str(v).encode("utf-8")) for v in record)
    lengths = np.fromiter((len(x) for x in ids_parts), dtype=np.int64, count=len(ids_parts))
    tokens = np.fromiter(itertools.chain.from_iterable(ids_parts), dtype=options.dtype, count=int(lengths.sum()))
    mask = np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=bool)
    return JobResult(tokens=tokens, lengths=lengths, issues=issues, text_bytes=text_bytes, mask=mask)
