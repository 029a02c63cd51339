"""``rho select``: offline token selection from score stores, as a mask store (+ an HTML report).

CPU (selection is cheap; no GPU needed, no distributed run):

    rho select --scores out/corpus.ref --base-scores out/corpus.base --ratio 0.6 --output out/corpus.mask
    rho select --scores out/corpus.ref --score reference --ratio 0.6 --scope global --output out/m --report sel.html
    rho select --scores out/corpus.ref --score reference --ratio 0.5 --scope filter --output out/docs   # perplexity filter

On one GPU / under torchrun: the same command (it reads and writes files only).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def select_command(
    scores: Annotated[str, typer.Option("--scores", help="Reference-model score store (rho score).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Mask store prefix: writes PREFIX.bin/.idx/.json.")],
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction of tokens to keep.")] = 0.6,
    base_scores: Annotated[Optional[str], typer.Option("--base-scores", help="Base-model score store of the same tokens (for --score excess).")] = None,
    scope: Annotated[str, typer.Option("--scope", help="document (top k of each document), global (top k of the corpus) or filter (whole documents by mean score, up to --ratio of the tokens).")] = "document",
    score: Annotated[str, typer.Option("--score", "--select-by", help="excess (base - reference, high kept), reference (low reference loss kept), training (high base loss), entropy (low reference entropy: rho score --entropy), random (the control, from --seed); A&B keeps tokens both choose, A|B either.")] = "excess",
    seed: Annotated[int, typer.Option("--seed", help="Seed of --score random.")] = 0,
    report: Annotated[Optional[str], typer.Option("--report", help="Also write a self-contained HTML report of the selection.")] = None,
    report_documents: Annotated[int, typer.Option(help="Documents shown in the report.")] = 20,
    force: Annotated[bool, typer.Option("--force", help="Replace existing outputs.")] = False,
) -> None:
    """Select tokens offline by a score function (excess loss by default): a mask store aligned to the tokens."""
    from rhocli.commands.console import lit, out
    from rhocli.core.errors import UsageError
    from rhocli.select.selection import SelectConfig, run_select

    if scope not in ("document", "global", "filter"):
        raise UsageError(f"--scope: expected document, global or filter, got {scope!r}")
    summary = run_select(SelectConfig(scores=scores, output=output, ratio=ratio, base_scores=base_scores, scope=scope,
                                      score=score, seed=seed, report=report, report_documents=report_documents, force=force))
    out.print(f"[green]wrote[/] {lit(summary.output)}.bin/.idx/.json: kept {summary.kept:,} of {summary.tokens:,} tokens "
              f"({summary.kept / max(summary.tokens, 1):.1%}) in {summary.documents:,} documents")
    if report:
        out.print(f"[green]wrote[/] {lit(report)}")
