"""``rho tokenize``: text files -> a Megatron token dataset (PREFIX.bin/.idx) + PREFIX.json manifest.

CPU (the only place tokenization runs; a GPU machine runs the same command):

    rho tokenize data/*.jsonl.gz --tokenizer tokenizer.model --output data/corpus --workers 8
    rho tokenize gsm8k.jsonl --json-key question --json-key answer --tokenizer hf_dir/ --output data/gsm8k
    rho tokenize --config configs/tokenize-gsm8k.yaml --force
    rho tokenize tora.jsonl --prompt-key question --response-key solution --chat-template tora \
        --mask-spans output --seq-length 1024 --tokenizer tokenizer.model --output data/tora   # + data/tora.mask

Under torchrun: tokenization is not distributed; run it once before training (one node, all cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rhocli.commands.console import human_bytes, human_count, lit, out


def tokenize_command(
    inputs: Annotated[
        Optional[list[str]],
        typer.Argument(help="Input files or globs: .jsonl, .jsonl.gz, .jsonl.zst, .txt, .parquet.", show_default=False),
    ] = None,
    tokenizer: Annotated[
        Optional[str], typer.Option("--tokenizer", "-t", help="SentencePiece .model, HF tokenizer.json or HF tokenizer dir.")
    ] = None,
    output: Annotated[
        Optional[str], typer.Option("--output", "-o", help="Output prefix: writes PREFIX.bin/.idx/.json.")
    ] = None,
    json_key: Annotated[
        Optional[list[str]],
        typer.Option("--json-key", help="Key (parquet column) with the text; repeat to join several into one document.  \\[default: text]"),
    ] = None,
    key_separator: Annotated[
        Optional[str], typer.Option(help="Separator between the values of several --json-key.  \\[default: newline]")
    ] = None,
    txt_mode: Annotated[
        Optional[str], typer.Option(help=".txt files: 'document' (one per file) or 'line' (one per non-blank line).  \\[default: document]")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option("--workers", "-w", help="Tokenizer processes; 0 = one per core.  \\[default: 0]")
    ] = None,
    append_eod: Annotated[
        Optional[bool], typer.Option("--append-eod/--no-append-eod", help="Append the EOS id after each document.  \\[default: append]")
    ] = None,
    prepend_bos: Annotated[
        Optional[bool], typer.Option("--prepend-bos/--no-prepend-bos", help="Prepend the BOS id to each document.  \\[default: no]")
    ] = None,
    on_error: Annotated[
        Optional[str], typer.Option(help="'fail' at the first bad document (file:line), or 'skip' and count it.  \\[default: fail]")
    ] = None,
    prompt_key: Annotated[
        Optional[str], typer.Option("--prompt-key", help="Instruction data: key with the prompt (with --response-key); also writes PREFIX.mask, the response tokens.")
    ] = None,
    response_key: Annotated[Optional[str], typer.Option("--response-key", help="Instruction data: key with the response (trained on).")] = None,
    messages_key: Annotated[
        Optional[str], typer.Option("--messages-key", help="Instruction data: key with a list of {role, content} messages; assistant turns are trained on.")
    ] = None,
    chat_template: Annotated[
        Optional[str], typer.Option("--chat-template", help="Instruction data: plain, tora, chatml, a YAML file, or 'tokenizer' (a HF tokenizer's own).  \\[default: plain]")
    ] = None,
    mask_spans: Annotated[
        Optional[list[str]], typer.Option("--mask-spans", help="Instruction data: parts of the response not trained on: 'output' (```output blocks).")
    ] = None,
    seq_length: Annotated[
        Optional[int], typer.Option("--seq-length", help="Instruction data: an example longer than this many tokens is an error (or skipped).")
    ] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help="Replace an existing dataset at --output.")] = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="YAML file with these options (flat or under 'tokenize:'); flags override it.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary (errors still print).")] = False,
) -> None:
    """Tokenize text into a Megatron IndexedDataset (.bin/.idx) with a rho manifest (.json)."""
    from rhocli.core.config import resolve_config
    from rhocli.core.errors import UsageError
    from rhocli.tokenize.pipeline import TokenizeConfig, run_tokenize

    if txt_mode is not None and txt_mode not in ("document", "line"):
        raise UsageError(f"--txt-mode: expected 'document' or 'line', got {txt_mode!r}")
    if json_key and (prompt_key or response_key or messages_key):
        raise UsageError("--json-key is for text; instruction data names its fields with --prompt-key/--response-key "
                         "or --messages-key")
    if on_error is not None and on_error not in ("fail", "skip"):
        raise UsageError(f"--on-error: expected 'fail' or 'skip', got {on_error!r}")
    cfg = resolve_config(
        TokenizeConfig,
        config,
        {
            "inputs": tuple(inputs) if inputs else None,
            "tokenizer": tokenizer,
            "output": output,
            "json_keys": tuple(json_key) if json_key else None,
            "key_separator": key_separator,
            "txt_mode": txt_mode,
            "workers": workers,
            "append_eod": append_eod,
            "prepend_bos": prepend_bos,
            "on_error": on_error,
            "prompt_key": prompt_key,
            "response_key": response_key,
            "messages_key": messages_key,
            "chat_template": chat_template,
            "mask_spans": tuple(mask_spans) if mask_spans else None,
            "seq_length": seq_length,
            "force": force,
        },
        section="tokenize",
    )
    if quiet:
        run_tokenize(cfg)
        return
    summary = _run_with_progress(cfg, run_tokenize)
    out.print(_summary_table(summary))
    if summary.created_directory:
        out.print(f"created the directory {lit(summary.created_directory)}")
    out.print(f"[green]wrote[/] {lit(summary.prefix)}.bin/.idx/.json  fingerprint {summary.fingerprint[:19]}…")
    if summary.trained_tokens is not None:
        out.print(f"[green]wrote[/] {lit(summary.prefix)}.mask.bin/.idx/.json  (rho train --mask {lit(summary.prefix)}.mask)")


def _run_with_progress(cfg, run_tokenize):
    """Run with a Rich progress bar on a terminal, or a plain status line every 30 s in a log."""
    import time

    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from rhocli.commands.console import err

    columns = (
        TextColumn("[bold]tokenize[/]"),
        BarColumn(),
        TaskProgressColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[docs]} docs"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
    )
    interactive = err.is_terminal
    last_log = [time.monotonic()]
    with Progress(*columns, console=err, transient=True, disable=not interactive) as progress:
        task = progress.add_task("tokenize", total=None, docs="0", tps="-")

        def on_progress(p) -> None:
            tps = human_count(p.tokens / p.elapsed_s) if p.elapsed_s > 0 else "-"
            if interactive:
                progress.update(task, total=p.bytes_total, completed=p.bytes_read, docs=human_count(p.documents), tps=tps)
            elif time.monotonic() - last_log[0] >= 30:
                last_log[0] = time.monotonic()
                pct = 100.0 * p.bytes_read / max(p.bytes_total, 1)
                err.print(f"tokenize {pct:5.1f}%  {human_count(p.documents)} docs  {tps} tok/s  {p.elapsed_s:.0f} s")

        return run_tokenize(cfg, on_progress=on_progress)


def _summary_table(s):
    from rich.table import Table

    table = Table(title=f"rho tokenize → {lit(s.prefix)}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("documents", f"{s.documents:,}")
    table.add_row("tokens", f"{s.tokens:,}  ({s.dtype})")
    table.add_row("tokens / document", f"{s.tokens / max(s.documents, 1):.1f}")
    if s.trained_tokens is not None:
        table.add_row("trained tokens (mask)", f"{s.trained_tokens:,}  ({s.trained_tokens / max(s.tokens, 1):.1%})")
    if s.skipped:
        for category, n in s.skipped.items():
            table.add_row(f"skipped: {category}", f"{n:,}")
    else:
        table.add_row("skipped", "0")
    if s.blank_lines:
        table.add_row("blank lines ignored", f"{s.blank_lines:,}")
    table.add_row("input", human_bytes(s.input_bytes))
    table.add_row("workers", str(s.workers))
    table.add_row("wall time", f"{s.wall_s:.2f} s")
    table.add_row(
        "throughput",
        f"{human_bytes(s.text_bytes / s.wall_s)}/s  {human_count(s.tokens / s.wall_s)} tok/s  {s.documents / s.wall_s:,.0f} docs/s",
    )
    return table
