"""``rho analyze``: the paper's analyses of a run (docs/analysis.md).

CPU (scoring a token sample with each checkpoint; the analysis itself is numpy):

    rho train configs/tiny.yaml --data out/corpus --save runs/clm --steps 400 --save-interval 50
    rho analyze dynamics runs/clm --data out/valid --output out/dynamics --sample 20000
    rho analyze dynamics --stores out/s/step_000050 --stores out/s/step_000100 ... --output out/dynamics
    rho analyze selection runs/slm --data out/valid --reference runs/ref --output out/selection --ratio 0.6
    rho train ... --reference runs/ref --trace-selection 20 --save runs/slm    # then:
    rho analyze context runs/slm --scores out/corpus.ref    # what a per-document store would have kept

One GPU: the same command; each checkpoint is scored by ``rho score`` on the GPU.

Under torchrun: not supported (it runs ``rho score`` once per checkpoint; that starts its own ranks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rhocli.commands import stage

analyze_app = typer.Typer(no_args_is_help=True, add_completion=False)


@analyze_app.command("dynamics", help="Per-token loss trajectories over a run's checkpoints: Rho-1's H→H / L→H / H→L / L→L (Fig. 2, 3).")
@stage
def dynamics_command(
    ctx: typer.Context,
    run: Annotated[Optional[Path], typer.Argument(help="Run directory whose checkpoints (step_*) are analysed.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Token dataset to take the sample from (held-out text).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory: dynamics.json, dynamics.html, the sample and its scores.")] = Path("dynamics"),
    sample: Annotated[int, typer.Option("--sample", help="Tokens in the sample (its first documents holding at least this many).")] = 20000,
    stores: Annotated[Optional[list[str]], typer.Option("--stores", help="Instead of RUN: existing score stores of one sample, one per checkpoint, in training order.")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Scoring window (default: each checkpoint's training length).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing report and score every checkpoint again.")] = False,
) -> None:
    """Per-token loss dynamics of a run."""
    from rhocli.analyze.dynamics import CATEGORIES, dynamics_of_run, run_dynamics
    from rhocli.commands.console import lit, out
    from rhocli.core.errors import UsageError

    if stores:
        if run is not None or data is not None:
            raise UsageError("--stores replaces RUN and --data: give one or the other")
        if len(stores) < 2:
            raise UsageError("--stores: give at least two score stores (two checkpoints)")
        dynamics, paths = run_dynamics(output, list(stores), force=force)
    else:
        if run is None or data is None:
            raise UsageError("give RUN and --data (or --stores)")
        scored = lambda step, done, total: out.print(f"scored the sample with step {step} ({done}/{total})")  # noqa: E731
        dynamics, paths = dynamics_of_run(run, data, output, sample, ctx.find_root().obj, force=force, seq_len=seq_len,
                                          on_scored=scored)
    out.print(f"{dynamics.categories.size:,} tokens over checkpoints {', '.join(map(str, dynamics.steps))}: "
              + ", ".join(f"{name} {dynamics.fractions[name]:.1%}" for name in CATEGORIES))
    out.print(f"[green]wrote[/] {lit(paths['json'])} and {lit(paths['html'])}")


@analyze_app.command("selection", help="What selective training keeps at each checkpoint: selected vs unselected losses (Fig. 6), the tokens over training (Fig. 14).")
@stage
def selection_command(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(help="Run directory whose checkpoints (step_*) are analysed.")],
    data: Annotated[str, typer.Option("--data", help="Token dataset to take the sample from.")],
    reference: Annotated[str, typer.Option("--reference", help="The reference model (a rho checkpoint or a HF directory), as for rho score.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory: selection.json, selection.html, the sample, its scores and masks.")] = Path("selection"),
    sample: Annotated[int, typer.Option("--sample", help="Tokens in the sample (its first documents holding at least this many).")] = 20000,
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction kept, as the run's --select-ratio.")] = 0.6,
    select_by: Annotated[str, typer.Option("--select-by", help="Score function, as the run's --select-by (rho select --score).")] = "excess",
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Scoring window (default: each model's training length).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing report and score again.")] = False,
) -> None:
    """What a selective run keeps, checkpoint by checkpoint."""
    from rhocli.analyze.selection import selection_of_run
    from rhocli.commands.console import lit, out

    scored = lambda step, done, total: out.print(f"scored the sample with step {step} ({done}/{total})")  # noqa: E731
    result, paths = selection_of_run(run, data, reference, output, sample, ctx.find_root().obj, ratio=ratio,
                                     score=select_by, force=force, seq_len=seq_len, on_scored=scored)
    for step, kept, sel, unsel, overlap in zip(result.steps, result.kept_fraction, result.selected_loss,
                                               result.unselected_loss, result.overlap_with_first):
        out.print(f"step {step}: kept {kept:.1%}, loss selected {sel:.3f} / unselected {unsel:.3f}, "
                  f"{overlap:.0%} of the first selection still selected")
    out.print(f"[green]wrote[/] {lit(paths['json'])} and {lit(paths['html'])}")


@analyze_app.command("context", help="Where in its samples a selective run keeps tokens (kept fraction by position), and how a reference scored on another context would have selected (Jaccard).")
@stage
def context_command(
    run: Annotated[Path, typer.Argument(help="A selective run trained with --trace-selection N.")],
    scores: Annotated[Optional[list[str]], typer.Option("--scores", help="Another reference source to compare: the document store per --data prefix, or a sample store.")] = None,
    step: Annotated[Optional[list[int]], typer.Option("--step", help="Traced steps to read (default: all).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the report as JSON here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output.")] = False,
) -> None:
    """Kept fraction by position within the sample, and the overlap with another score source."""
    from rich.table import Table

    from rhocli.analyze.context import context_report, write_report
    from rhocli.commands.console import lit, out

    report = context_report(run, list(scores or []), list(step or []))
    out.print(f"{lit(report.run)}: steps {report.steps[0]}-{report.steps[-1]}, {report.scope} scope, top "
              f"{report.ratio[-1]:.0%}")
    sources = [("run", f"kept with the run's reference ({report.source})")]
    if report.other:
        sources.append(("other", f"kept with {lit(report.other)}"))
    for key, title in sources:
        table = Table(title=title, title_justify="left")
        for name in ("positions", "kept", "ref loss", "excess"):
            table.add_column(name, justify="left" if name == "positions" else "right")
        for bin_label, b in report.by_position[key].items():
            table.add_row(bin_label, f"{b['kept_fraction']:.1%}", f"{b['ref_loss']:.3f}", f"{b['excess']:.3f}")
        out.print(table)
    if report.jaccard:
        out.print(f"overlap of the kept tokens (Jaccard), per step: mean {sum(report.jaccard) / len(report.jaccard):.3f} "
                  f"(min {min(report.jaccard):.3f}, max {max(report.jaccard):.3f})")
    path = write_report(report, output, force)
    if path is not None:
        out.print(f"[green]wrote[/] {lit(path)}")
