"""``rho demo``: the whole pipeline on the demo's own corpus, CLM vs SLM, with a results table and an
HTML report. Everything goes under one output directory.

CPU (a few minutes on 2 cores):

    rho demo                                  # writes rho-demo/ (report.html, results.json, ...)
    rho demo --output /tmp/demo --size tiny   # seconds: every stage, numbers mean little
    rho demo --tp 2 --pp 2 --force            # the same pipeline on 4 gloo worker processes

One GPU: the same command (train and score use it; --size large is the size for it).

Under torchrun: not supported (the demo launches its own workers for --tp/--pp); run the stages
themselves under torchrun, as the demo prints them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rhocli.commands.console import lit, out


def demo_command(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for everything the demo writes.")] = Path("rho-demo"),
    size: Annotated[str, typer.Option("--size", help="tiny (seconds), small (minutes on 2 CPU cores) or large (GPU).")] = "small",
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel size for train and score (1 or 2).")] = 1,
    pp: Annotated[int, typer.Option("--pp", help="Pipeline-parallel size for train and score (1, 2 or 4).")] = 1,
    ratio: Annotated[float, typer.Option("--ratio", help="SLM: fraction of tokens trained on.")] = 0.6,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the corpus and the runs.")] = 1234,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
) -> None:
    """Run tokenize → train reference → score → train CLM and SLM → evaluate → select on an embedded corpus."""
    import os

    from rhocli.core.errors import UsageError
    from rhocli.core.launch import under_torchrun
    from rhocli.demo.pipeline import DemoConfig, DemoRun, check_output_dir

    if under_torchrun():
        raise UsageError("rho demo starts its own workers; run it without torchrun (--tp/--pp choose the layout)")
    cfg = DemoConfig(output=output, size=size, tp=tp, pp=pp, ratio=ratio, seed=seed, force=force)
    check_output_dir(cfg)
    from rhocli.core.megatron_io import quiet_megatron

    quiet_megatron()
    out.print(f"[bold]rho demo[/]: selective language modeling in miniature (size {size}, tp {tp}, pp {pp}, "
              f"SLM ratio {ratio:g}) → {lit(output)}")
    status = None

    def on_event(e) -> None:
        nonlocal status
        if e.seconds is None:
            out.print(f"\n[bold cyan][{e.index}/{e.total}] {e.name}[/]")
            if e.command:
                out.print(lit(e.command.replace(str(output) + os.sep, "")), style="dim", soft_wrap=True)
            if out.is_terminal:
                status = out.status(f"{e.name}…")
                status.start()
        else:
            if status is not None:
                status.stop()
                status = None
            out.print(f"  [green]done[/] in {e.seconds:.1f} s: {lit(e.summary)}", soft_wrap=True)

    try:
        # every stage is a rho command line, run through the app's own entry point (rhocli.app.invoke)
        results = DemoRun(cfg, ctx.find_root().obj, on_event).run()
    except KeyboardInterrupt:
        from rhocli.core.errors import Interrupted

        raise Interrupted(f"demo interrupted; what it wrote so far stays in {output} (run again with --force)") from None
    finally:
        if status is not None:
            status.stop()
    out.print()
    out.print(_results_table(results))
    out.print(_kinds_table(results))
    out.print(_verdict(results))
    out.print(f"\nEverything is under [bold]{lit(output)}[/]: open [bold]{lit(output / 'report.html')}[/] "
              f"(results.json has the numbers; total {results['seconds']['total']:.0f} s)")


def _results_table(results):
    from rich.table import Table

    from rhocli.demo.report import results_table_rows

    held = results["heldout"]
    t = Table(title="Held-out loss on clean problems (nats/token), same corpus and steps", title_justify="left")
    t.add_column("step", justify="right")
    t.add_column("CLM", justify="right")
    t.add_column(f"SLM {results['config']['ratio']:.0%}", justify="right")
    for step, clm, slm in results_table_rows(results):
        better = slm != "-" and float(slm) < float(clm)
        t.add_row(step, clm, f"[green]{slm}[/]" if better else slm)
    t.add_section()
    for kind in ("result", "text"):
        if kind in held["clm"]:
            t.add_row(f"final, {kind} tokens", f"{held['clm'][kind]:.4f}", f"{held['slm'][kind]:.4f}")
    acc = results["accuracy"]
    t.add_row(f"answers right ({acc['clm']['problems']} problems)", f"{acc['clm']['acc']:.1f} %", f"{acc['slm']['acc']:.1f} %")
    t.caption = f"reference model (trained on clean problems): {held['reference']['all']:.4f}"
    return t


def _kinds_table(results):
    from rich.table import Table

    t = Table(title="Which tokens SLM's rule keeps (corpus sample, by kind)", title_justify="left")
    for c in ("kind", "tokens", "kept"):
        t.add_column(c, justify="left" if c == "kind" else "right")
    for kind, v in results["kept_by_kind"].items():
        if v["tokens"]:
            t.add_row(kind, f"{v['tokens']:,}", f"{v['kept']:.0%}")
    return t


def _verdict(results) -> str:
    reach = results["slm_steps_to_clm_final"]
    steps = results["curves"]["clm"]["valid"][-1][0]
    if reach:
        return f"SLM reached CLM's final held-out loss at step {reach:.0f} of {steps}: {steps / reach:.2f}x fewer steps."
    return "SLM did not reach CLM's final held-out loss within the budget (see report.html)."
