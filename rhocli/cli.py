"""The ``rho`` command: one Typer app, one module per stage under ``rhocli/commands``.

This is the only layer that prints. Library code raises ``rhocli.errors.RhoError`` subclasses; ``main``
turns them into one red line and the class's exit code (``RHO_DEBUG=1`` shows the traceback). Stage
modules import torch / megatron-core inside their functions, so ``rho --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from rhocli import __version__
from rhocli.commands import stage
from rhocli.commands.bench import bench_app
from rhocli.commands.tokenize import tokenize_command
from rhocli.commands.convert import convert_command
from rhocli.commands.demo import demo_command
from rhocli.commands.score import score_command
from rhocli.commands.select import select_command
from rhocli.commands.train import train_command

app = typer.Typer(
    name="rho",
    help="rho: Rho-1's Selective Language Modeling at Megatron scale.\n\n"
    "Pipeline: tokenize → train (reference) → score → select → train --scores (selective) → convert-hf.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"rho {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print rho's version and exit."),
    ] = None,
) -> None:
    """rho: Rho-1's Selective Language Modeling at Megatron scale."""


app.command("tokenize", help="Tokenize text files into a Megatron token dataset (.bin/.idx) + manifest.")(
    stage(tokenize_command)
)

app.command("train", help="Train a causal LM, or a selective one (--scores, --select-ratio), on megatron-core with TP/PP/DP.")(
    stage(train_command)
)

app.command("score", help="Score a token dataset with a reference model: per-token losses aligned to its documents.")(
    stage(score_command)
)

app.command("select", help="Offline token selection from scores (excess or reference loss), with an HTML report.")(
    stage(select_command)
)

app.command("convert-hf", help="Convert between Hugging Face Llama/Mistral and rho checkpoints (any TP/PP).")(
    stage(convert_command)
)

app.command("demo", help="Run the whole pipeline on a small embedded corpus (CPU, minutes) and compare CLM vs SLM.")(
    stage(demo_command)
)

app.add_typer(bench_app, name="bench", help="Benchmarks that print numbers: tokenize, train, kernel, score.")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``rho`` console script."""
    from rhocli.errors import INTERNAL_ERROR_EXIT_CODE, Interrupted, RhoError

    debug = os.environ.get("RHO_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, prog_name="rho")
    except RhoError as err:
        from rhocli.console import err as err_console

        if debug:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # outside a stage (e.g. while parsing arguments)
        sys.exit(Interrupted.exit_code)
    except Exception:
        from rhocli.console import err as err_console

        if debug:
            raise
        exc_type, exc, _ = sys.exc_info()
        err_console.print(
            f"[bold red]internal error:[/] {exc_type.__name__}: {exc} — this is a bug in rho; "
            "rerun with RHO_DEBUG=1 for the traceback and report it",
            soft_wrap=True,
        )
        sys.exit(INTERNAL_ERROR_EXIT_CODE)
