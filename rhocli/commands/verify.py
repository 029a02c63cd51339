"""``rho verify``: check stores and checkpoints byte by byte (structure, counts, content fingerprint,
values), e.g. after copying them between machines or before a long run.

CPU (it only reads files):

    rho verify out/corpus out/corpus.ref out/corpus.mask runs/ref

On one GPU / under torchrun: the same command, on any one machine that sees the files.
"""

from __future__ import annotations

from typing import Annotated

import typer

from rhocli.commands.console import lit, out


def verify_command(
    paths: Annotated[list[str], typer.Argument(help="Store prefixes (tokens, scores, masks) or checkpoint directories.")],
) -> None:
    """Check stores and checkpoints fully; exit 4 when one is damaged."""
    from rich.table import Table

    from rhocli.core.errors import BadInputError
    from rhocli.verify.checks import verify_path

    results = [verify_path(p) for p in paths]
    table = Table(title="rho verify", title_justify="left")
    for column in ("path", "kind", "checks"):
        table.add_column(column)
    for r in results:
        checks = "\n".join(lit(c) for c in r.passed)
        if r.problem:
            checks += ("\n" if checks else "") + f"[red]{lit(r.problem)}[/]"
        table.add_row(lit(r.path), r.kind, checks)
    out.print(table)
    damaged = [r for r in results if r.problem]
    if damaged:
        raise BadInputError(f"{len(damaged)} of {len(results)} failed: {damaged[0].problem}")
    out.print(f"[green]verified[/] {len(results)} of {len(results)}")
