"""The ``rho`` command: one Typer app, one thin module per verb under ``rhocli/commands``.

This is the top layer and, with the commands, the only one that prints. Stages and core raise
``rhocli.core.errors.RhoError`` subclasses, the engine its own types; ``main`` turns any of them into
one red line and the exit code of the one table (``exit_code_for``; ``RHO_DEBUG=1`` shows the
traceback). Stage modules import torch / megatron-core inside their functions, so ``rho --help``
stays fast.

``invoke(argv)`` is the one public way to run a rho command line from Python (the demo and the
experiments use it): exactly what ``rho ARGV`` does, with its output silenced and its errors raised.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Callable, Optional

import typer

from rhocli import __version__
from rhocli.commands import stage
from rhocli.commands.analyze import analyze_app
from rhocli.commands.bench import bench_app
from rhocli.commands.convert import convert_command
from rhocli.commands.demo import demo_command
from rhocli.commands.eval import eval_command
from rhocli.commands.score import score_command
from rhocli.commands.select import select_command
from rhocli.commands.tokenize import tokenize_command
from rhocli.commands.train import train_command
from rhocli.commands.verify import verify_command
from rhocli.core.processes import adopt_spawned_child

adopt_spawned_child()  # a spawned child of a rho process (a rank, a megatron helper) dies with it

app = typer.Typer(
    name="rho",
    help="rho: Rho-1's Selective Language Modeling at Megatron scale.\n\n"
    "Pipeline: tokenize → train (reference) → score → select → train --scores (selective) → convert-hf.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

#: how error messages name the engine's parallel sizes (``parallel.errors.LayoutError.render``)
SIZE_FLAGS = {"tp": "--tp", "pp": "--pp", "dp": "--dp", "cp": "--cp", "vp": "--virtual-pp"}


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"rho {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print rho's version and exit."),
    ] = None,
) -> None:
    """rho: Rho-1's Selective Language Modeling at Megatron scale."""
    # commands that run other rho command lines (demo, bench) get the entry point from here
    ctx.obj = invoke


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

app.command("eval", help="Few-shot GSM8K / MATH accuracy by generation: chain of thought, PAL, tool-integrated (ToRA); --regrade, --lm-eval.")(
    stage(eval_command)
)

app.command("verify", help="Check token, score and mask stores and checkpoints byte by byte (fingerprints, values).")(
    stage(verify_command)
)

app.add_typer(bench_app, name="bench", help="Benchmarks that print numbers: tokenize, train, kernel, score.")
app.add_typer(analyze_app, name="analyze", help="The paper's analyses of a run: token-loss dynamics, what selection keeps.")


def invoke(argv: list[str]) -> None:
    """Run ``rho ARGV`` in this process through the app (its output silenced); a failing command
    raises its error (a RhoError, or the engine's), as ``main`` would report it."""
    from rhocli.commands.console import out

    was_quiet = out.quiet
    out.quiet = True
    try:
        app(args=[str(a) for a in argv], prog_name="rho", standalone_mode=False)
    finally:
        out.quiet = was_quiet


def message_for(err: BaseException) -> str:
    """The one line shown for ``err``: its text, with the engine's sizes named by their flags."""
    from rhocli.core.errors import one_line

    render = getattr(err, "render", None)
    return render(SIZE_FLAGS) if callable(render) else one_line(err)


def report(err: Exception) -> int:
    """Prints ``err`` as rho reports it (one red line; an internal error asks for a bug report, or
    re-raises under RHO_DEBUG=1) and returns its exit code."""
    from rhocli.commands.console import err as err_console, lit
    from rhocli.core.errors import category_for, exit_code_for

    debug = os.environ.get("RHO_DEBUG", "") not in ("", "0")
    if category_for(err) is not None:
        if debug:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {lit(message_for(err))}", markup=True, highlight=False, soft_wrap=True)
        return exit_code_for(err)
    if debug:
        raise err
    err_console.print(
        f"[bold red]internal error:[/] {type(err).__name__}: {lit(err)} — this is a bug in rho; "
        "rerun with RHO_DEBUG=1 for the traceback and report it",
        soft_wrap=True,
    )
    return exit_code_for(err)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``rho`` console script."""
    from rhocli.core.errors import Interrupted
    from rhocli.core.processes import stacks_on_sigusr1

    stacks_on_sigusr1()
    try:
        app(args=argv, prog_name="rho")
    except KeyboardInterrupt:  # outside a stage (e.g. while parsing arguments)
        sys.exit(Interrupted.exit_code)
    except Exception as err:
        sys.exit(report(err))


def run_recipe(recipe_main: Callable[[], int]) -> int:
    """The entry of a recipe (experiments/*.py): runs it and reports a failing rho command, or a bad
    recipe input, as ``rho`` itself would (one line, the same exit code)."""
    from rhocli.core.errors import Interrupted

    try:
        return recipe_main()
    except KeyboardInterrupt:
        return Interrupted.exit_code
    except Exception as err:
        return report(err)
