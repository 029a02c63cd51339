"""``rho tokenize`` as a library: text files in, a Megatron token dataset + manifest out.

The main process reads and cuts inputs into jobs (``rhocli.tokenize.sources``), ``workers`` forked
processes decode, parse and tokenize them (``rhocli.tokenize.worker``), and the main process writes
the results in job order through the token format's writer (megatron-core's ``IndexedDatasetBuilder``). megatron-core is imported on a background
thread meanwhile (seconds of start-up that overlap the tokenization); results that arrive before it is ready are held in memory. Outputs are staged in a
hidden temporary directory and moved into place only when complete.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Literal

from rhocli import __version__
from rhocli.core.config import write_resolved_config
from rhocli.core.errors import BadInputError, LoadError, UsageError, WorkerError
from rhocli.core.formats import tokens as token_format
from rhocli.core.formats.staging import StagedOutput, check_outputs_free
from rhocli.core.processes import DeferredSignals, SignalsStayWithMainThread
from rhocli.tokenize.instruct import MASK_SPANS, InstructOptions, load_template
from rhocli.tokenize.sources import ReadState, expand_inputs, iter_jobs
from rhocli.tokenize.worker import CATEGORIES, INSTRUCT_CATEGORIES, EncodeOptions, JobResult, encode_job, init_worker


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Options of ``rho tokenize`` (flags, or a YAML file's ``tokenize:`` section)."""

    inputs: tuple[str, ...]
    """Input files or globs: .jsonl, .jsonl.gz, .jsonl.zst, .txt, .parquet."""
    tokenizer: str
    """A SentencePiece .model file, a HF tokenizer.json, or a HF tokenizer directory."""
    output: str
    """Output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json and PREFIX.config.yaml."""
    json_keys: tuple[str, ...] = ("text",)
    """JSON keys (parquet columns) holding the text; several keys are joined into one document."""
    key_separator: str = "\n"
    """Placed between the values of several --json-key in one document."""
    txt_mode: Literal["document", "line"] = "document"
    """.txt files: one document per file, or one per non-blank line."""
    workers: int = 0
    """Tokenizer processes; 0 means one per available CPU core. Output is identical for any value."""
    append_eod: bool = True
    """Append the tokenizer's end-of-document id (its EOS) to every document, as Megatron does."""
    prepend_bos: bool = False
    """Prepend the tokenizer's BOS id to every document (Llama-style pretraining data)."""
    on_error: Literal["fail", "skip"] = "fail"
    """fail: stop at the first bad document with file:line. skip: count it by category and go on."""
    force: bool = False
    """Replace an existing dataset at the output prefix."""
    prompt_key: str | None = None
    """Instruction data: the key (column) with the prompt; needs response_key. Writes PREFIX.mask too."""
    response_key: str | None = None
    """Instruction data: the key (column) with the response, the only text trained on."""
    messages_key: str | None = None
    """Instruction data: the key with a list of {role, content} messages; every assistant turn is trained."""
    chat_template: str = "plain"
    """Instruction data: plain, tora, chatml (rhocli/tokenize/templates), a YAML file, or 'tokenizer'."""
    mask_spans: tuple[str, ...] = ()
    """Instruction data: spans of the response not to train on; 'output' = ```output blocks (ToRA)."""
    seq_length: int | None = None
    """Instruction data: refuse (or with on_error skip, count) examples longer than this many tokens."""

    @property
    def instruct(self) -> bool:
        return bool(self.prompt_key or self.response_key or self.messages_key)


@dataclasses.dataclass
class TokenizeProgress:
    bytes_read: int
    bytes_total: int
    documents: int
    tokens: int
    text_bytes: int
    elapsed_s: float


@dataclasses.dataclass
class TokenizeSummary:
    prefix: str
    documents: int
    tokens: int
    text_bytes: int
    input_bytes: int
    skipped: dict[str, int]
    blank_lines: int
    workers: int
    dtype: str
    fingerprint: str
    wall_s: float
    #: seconds from the first to the last job result: the steady-state window
    steady_s: float
    steady_documents: int
    steady_tokens: int
    steady_text_bytes: int
    outputs: list[str]
    #: the directory made for the output (it did not exist), or None
    created_directory: str | None = None
    #: instruction data: the tokens PREFIX.mask keeps; None for plain text
    trained_tokens: int | None = None


def _output_paths(prefix: str, instruct: bool) -> list[Path]:
    # The manifest comes last: its presence marks a complete dataset (and, for instruction data, the
    # mask store beside it, which is moved into place before it).
    masks = [Path(f"{prefix}.mask{ext}") for ext in (".bin", ".idx", ".json")] if instruct else []
    return [
        token_format.bin_path(prefix),
        token_format.idx_path(prefix),
        Path(prefix + ".config.yaml"),
        *masks,
        token_format.manifest_path(prefix),
    ]


def _instruct_options(cfg: TokenizeConfig, tokenizer, sources) -> InstructOptions | None:
    """The instruction-data options, checked (UsageError naming the flag); None for plain text."""
    if not cfg.instruct:
        for flag, given in (("--chat-template", cfg.chat_template != "plain"), ("--mask-spans", bool(cfg.mask_spans)),
                            ("--seq-length", cfg.seq_length is not None)):
            if given:
                raise UsageError(f"{flag} is for instruction data: give --prompt-key/--response-key or --messages-key")
        return None
    if cfg.messages_key and (cfg.prompt_key or cfg.response_key):
        raise UsageError("--messages-key: give it, or --prompt-key with --response-key, not both")
    if not cfg.messages_key and not (cfg.prompt_key and cfg.response_key):
        raise UsageError("--prompt-key and --response-key go together (or give --messages-key)")
    for flag in cfg.mask_spans:
        if flag not in MASK_SPANS:
            raise UsageError(f"--mask-spans: expected one of {', '.join(MASK_SPANS)}, got {flag!r}")
    if cfg.seq_length is not None and cfg.seq_length < 2:
        raise UsageError(f"--seq-length must be >= 2, got {cfg.seq_length}")
    for source in sources:
        if source.kind == "txt":
            raise UsageError(f"{source.path}: instruction data is .jsonl or .parquet (records with keys), not .txt")
    try:
        load_template(cfg.chat_template, tokenizer)
    except ValueError as err:
        raise UsageError(f"--chat-template {err}") from None
    return InstructOptions(cfg.prompt_key, cfg.response_key, cfg.messages_key, cfg.chat_template, tuple(cfg.mask_spans))


def _start_workers(workers: int, options: EncodeOptions) -> ProcessPoolExecutor:
    """Fork ``workers`` tokenizer processes now, before the caller starts any thread.

    fork (not spawn) because spawn re-imports the caller's ``__main__`` (breaking scripts without a
    ``__main__`` guard, stdin, notebooks) and costs ~0.3 s per worker; forking is safe here because
    this process has no other thread yet, and the workers only tokenize.
    """
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=init_worker,
        initargs=(options,),
    )
    pool.submit(os.getpid).result()  # a fork context launches every worker on the first submit
    return pool


def run_tokenize(
    cfg: TokenizeConfig,
    on_progress: Callable[[TokenizeProgress], None] | None = None,
) -> TokenizeSummary:
    """Tokenize ``cfg.inputs`` into the dataset ``cfg.output``; raises ``RhoError`` on bad input."""
    from rhocli.core.megatron_io import BackgroundImport
    from rhocli.core.tokenizers import load_tokenizer

    t_start = time.perf_counter()
    if cfg.workers < 0:
        raise UsageError(f"--workers must be >= 0 (0 = one per core), got {cfg.workers}")
    if not cfg.json_keys:
        raise UsageError("--json-key: give at least one key")
    prefix = str(cfg.output)
    if not Path(prefix).name or prefix.endswith(os.sep):
        raise UsageError(f"--output {prefix!r}: give a file prefix such as data/corpus, not a directory")
    outputs = _output_paths(prefix, cfg.instruct)
    check_outputs_free(outputs, cfg.force)
    sources = expand_inputs(cfg.inputs)
    tokenizer = load_tokenizer(cfg.tokenizer)
    instruct = _instruct_options(cfg, tokenizer, sources)
    info = tokenizer.info
    if cfg.append_eod and info.eod_id is None:
        raise LoadError(f"{info.path}: tokenizer has no end-of-document (EOS) token; use --no-append-eod")
    if cfg.prepend_bos and info.bos_id is None:
        raise LoadError(f"{info.path}: tokenizer has no BOS token; drop --prepend-bos")
    dtype = token_format.optimal_token_dtype(info.vocab_size)
    workers = cfg.workers or default_workers()
    options = EncodeOptions(
        tokenizer_path=str(cfg.tokenizer),
        json_keys=tuple(cfg.json_keys),
        key_separator=cfg.key_separator,
        bos_id=info.bos_id if cfg.prepend_bos else None,
        eod_id=info.eod_id if cfg.append_eod else None,
        dtype=dtype,
        instruct=instruct,
        max_tokens=cfg.seq_length if instruct else None,
    )
    read_keys = instruct.keys if instruct else options.json_keys
    bytes_total = sum(s.size for s in sources)
    states = [ReadState() for _ in sources]
    docs_per_source = [0] * len(sources)
    skipped = {c: 0 for c in (INSTRUCT_CATEGORIES if instruct else CATEGORIES)}
    masks: list = []  # instruction data: each job's (trained-token mask, document lengths), in job order
    totals = {"documents": 0, "tokens": 0, "text_bytes": 0}
    steady = {"t0": None, "t1": None, "documents": 0, "tokens": 0, "text_bytes": 0}

    with StagedOutput(outputs, force=cfg.force) as stage, stage.staged_writes():
        with SignalsStayWithMainThread():  # the executor's threads and the import thread: no signals
            pool = _start_workers(workers, options)
            # Only now start the thread importing megatron-core: the workers are forked from a process
            # that has no other thread yet, and they never import torch.
            megatron = BackgroundImport()
        writer = token_format.TokenDatasetWriter(stage.path(outputs[0]), dtype, megatron.get, megatron.ready)
        window: collections.deque[tuple[int, Future]] = collections.deque()
        max_in_flight = 4 * workers + 4

        signals = DeferredSignals()  # Ctrl-C / SIGTERM never cut the executor's own calls in half

        def handle(source_index: int, future: Future) -> None:
            with signals.critical():
                result: JobResult = future.result()
            source = sources[source_index]
            for lineno, category, message in result.issues:
                if cfg.on_error == "fail":
                    hint = " (--on-error skip skips such documents)"
                    raise BadInputError(f"{source.path}:{lineno}: {message}{hint}")
                skipped[category] += 1
            writer.add_documents(result.tokens, result.lengths.tolist())
            if result.mask is not None:
                masks.append((result.mask, result.lengths))
            n_docs, n_tokens = len(result.lengths), int(result.lengths.sum())
            docs_per_source[source_index] += n_docs
            totals["documents"] += n_docs
            totals["tokens"] += n_tokens
            totals["text_bytes"] += result.text_bytes
            now = time.perf_counter()
            if steady["t0"] is None:
                steady["t0"] = now  # this first job's work is start-up, not steady state
            else:
                steady["documents"] += n_docs
                steady["tokens"] += n_tokens
                steady["text_bytes"] += result.text_bytes
            steady["t1"] = now
            if on_progress is not None:
                on_progress(
                    TokenizeProgress(
                        bytes_read=sum(s.bytes_read for s in states),
                        bytes_total=bytes_total,
                        documents=totals["documents"],
                        tokens=totals["tokens"],
                        text_bytes=totals["text_bytes"],
                        elapsed_s=now - t_start,
                    )
                )

        with signals:
            try:
                for source_index, source in enumerate(sources):
                    for job in iter_jobs(source, read_keys, cfg.txt_mode, states[source_index]):
                        with signals.critical():
                            window.append((source_index, pool.submit(encode_job, job)))
                        while len(window) > max_in_flight:
                            handle(*window.popleft())
                while window:
                    handle(*window.popleft())
            except BrokenProcessPool as err:
                _stop(pool, signals)
                raise WorkerError(
                    "a tokenizer worker process died (out of memory, or killed); nothing was written"
                ) from err
            except BaseException:
                _stop(pool, signals)
                raise
            with signals.critical():
                pool.shutdown(wait=True)

        if totals["documents"] == 0:
            raise BadInputError(
                f"{sources[0].path}: no documents to write"
                + (f" (skipped: {_format_skipped(skipped)})" if any(skipped.values()) else "")
            )
        fingerprint = writer.finalize(stage.path(outputs[1]))
        manifest = {
            "created_by": f"rho {__version__}",
            "fingerprint": fingerprint,
            "tokenizer": info.to_dict(),
            "dtype": dtype,
            "documents": totals["documents"],
            "tokens": totals["tokens"],
            "sequences_per_document": 1,
            "skipped": skipped,
            "blank_lines_ignored": sum(s.blank_lines for s in states),
            "sources": [
                {
                    "path": str(source.path),
                    "bytes": source.size,
                    "sha256": state.sha256,
                    "documents": n_docs,
                }
                for source, state, n_docs in zip(sources, states, docs_per_source)
            ],
            # `workers` is left out on purpose: the dataset's bytes do not depend on it.
            "options": {
                **({"instruct": {"prompt_key": cfg.prompt_key, "response_key": cfg.response_key,
                                 "messages_key": cfg.messages_key, "chat_template": cfg.chat_template,
                                 "mask_spans": list(cfg.mask_spans), "seq_length": cfg.seq_length,
                                 "mask": f"{prefix}.mask"}} if instruct else {}),
                "json_keys": list(cfg.json_keys),
                "key_separator": cfg.key_separator,
                "txt_mode": cfg.txt_mode,
                "append_eod": cfg.append_eod,
                "prepend_bos": cfg.prepend_bos,
                "on_error": cfg.on_error,
            },
        }
        if instruct:
            _write_response_mask(stage, outputs[3:6], prefix, manifest, masks, cfg)
        write_resolved_config(cfg, stage.path(outputs[2]), stage="tokenize")
        token_format.TOKENS.write(stage.path(outputs[-1]), manifest)
        created = stage.created
        stage.commit()

    t_end = time.perf_counter()
    steady_s = (steady["t1"] - steady["t0"]) if steady["t0"] is not None else 0.0
    return TokenizeSummary(
        prefix=prefix,
        documents=totals["documents"],
        tokens=totals["tokens"],
        text_bytes=totals["text_bytes"],
        input_bytes=bytes_total,
        skipped={k: v for k, v in skipped.items() if v},
        blank_lines=sum(s.blank_lines for s in states),
        workers=workers,
        dtype=dtype,
        fingerprint=fingerprint,
        wall_s=t_end - t_start,
        steady_s=steady_s,
        steady_documents=steady["documents"],
        steady_tokens=steady["tokens"],
        steady_text_bytes=steady["text_bytes"],
        outputs=[str(p) for p in outputs],
        created_directory=str(created) if created is not None else None,
        trained_tokens=int(sum(int(m.sum()) for m, _ in masks)) if instruct else None,
    )


def _write_response_mask(stage: StagedOutput, paths: list[Path], prefix: str, manifest: dict, masks: list,
                         cfg: TokenizeConfig) -> None:
    """PREFIX.mask: the ``rho.mask`` store of the trained (response) tokens, made for this dataset."""
    import numpy as np

    from rhocli.core.formats.masks import write_mask_files

    mask = np.concatenate([m for m, _ in masks])
    lengths = np.concatenate([n for _, n in masks])
    write_mask_files([stage.path(p) for p in paths], mask, lengths, {
        "created_by": f"rho {__version__}",
        "token_dataset": {"prefix": prefix, "fingerprint": manifest["fingerprint"], "documents": manifest["documents"]},
        "selection": {"score": "response", "chat_template": cfg.chat_template, "mask_spans": list(cfg.mask_spans),
                      "rule": "a token is kept when its character span touches the assistant's content or turn end"},
        "kept": int(mask.sum()), "tokens": int(mask.size),
    })


def _stop(pool: ProcessPoolExecutor, signals: DeferredSignals) -> None:
    """Stop the pool on a failure or an interrupt: queued jobs are cancelled, running ones end (jobs are
    small), and the executor's manager thread is joined before the exception goes on. Left running,
    that thread races the interpreter's exit hook for the executor's wake-up pipe (CPython 3.11:
    "Bad file descriptor" printed after rho's one-line error)."""
    with signals.critical():
        pool.shutdown(wait=True, cancel_futures=True)


def _format_skipped(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in skipped.items() if v)
