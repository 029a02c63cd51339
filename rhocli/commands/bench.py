"""``rho bench``: benchmarks that print numbers (targets live here, not in timed tests).

CPU:

    rho bench tokenize data/train.jsonl --tokenizer tokenizer.model --workers 2
    rho bench tokenize big.jsonl -t tokenizer.model -w 2 --json-key text --megatron-lm ~/src/Megatron-LM

Kernel (CPU; on a GPU the CUDA and megatron rows are added):

    rho bench kernel --shape 8192x32000
    rho bench kernel --dtype bfloat16 --shape 32768x32000

Training (CPU, one GPU; the benchmark starts its own workers like rho train):

    rho bench train configs/tiny.yaml --steps 30
    rho bench train configs/tinyllama-1.1b.yaml --steps 10 --set train.micro_batch_size=4

Comparisons run rounds of two fresh runs taking turns step by step (A B B A ...; or one after the
other, --alternate run) and report the median over rounds of B's step time over A's, with its spread:

    rho bench train configs/tiny.yaml --select-ratio 0.6                 # selective vs plain step
    rho bench train configs/tiny.yaml --reference-online                 # SLM: reference online vs a store
    rho bench train configs/tiny.yaml --vs-set train.recompute=full      # a setting's cost
    rho bench train configs/tiny.yaml --vs-source ../rho-old             # regression vs another checkout

Scoring (CPU, one GPU): rho score against a transformers loop on the same windows and weights:

    rho bench score --model runs/ref --data out/gsm8k --documents 1500 --repeats 3

Under torchrun: not supported; each benchmark starts the processes it measures.

Each benchmark lives with the stage it measures (``rhocli/<stage>/bench.py``; the kernel's in
``rhocli/bench/kernel.py``) and returns its numbers; the tables are made here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rhocli.commands import stage
from rhocli.commands.console import human_bytes, lit, out

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print numbers.")


@bench_app.command("tokenize")
@stage
def bench_tokenize_command(
    inputs: Annotated[list[str], typer.Argument(help="Input files or globs, as for rho tokenize.")],
    tokenizer: Annotated[str, typer.Option("--tokenizer", "-t", help="Tokenizer, as for rho tokenize.")],
    workers: Annotated[int, typer.Option("--workers", "-w", help="Worker processes (0 = one per core).")] = 1,
    json_key: Annotated[Optional[list[str]], typer.Option("--json-key", help="JSON key(s).  \\[default: text]")] = None,
    megatron_lm: Annotated[
        Optional[Path],
        typer.Option(
            help="A Megatron-LM checkout: also time its tools/preprocess_data.py on the same input "
            "(jsonl, one key, SentencePiece) and check the documents are token-identical."
        ),
    ] = None,
    keep: Annotated[Optional[Path], typer.Option(help="Keep outputs in this directory instead of a temp dir.")] = None,
) -> None:
    """Documents/s, MB/s, tokens/s of rho tokenize: whole process and steady state."""
    from rhocli.tokenize.bench import run_bench_tokenize

    report = run_bench_tokenize(
        inputs=inputs,
        tokenizer=tokenizer,
        workers=workers,
        json_keys=tuple(json_key or ("text",)),
        megatron_lm=megatron_lm,
        keep=keep,
    )
    out.print(_tokenize_table(report))


def _tokenize_table(report):
    from rich.table import Table

    table = Table(title=f"rho bench tokenize: {lit(', '.join(report.inputs))}  workers={report.workers}", title_justify="left")
    for col in ("run", "wall s", "docs/s", "MB/s", "Mtok/s"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for row in report.rows:
        table.add_row(*row.row())
    speedup = report.speedup()
    if speedup is not None:
        same = "token-identical" if report.megatron_identical else "DIFFERENT TOKENS"
        table.caption = f"rho is {speedup:.2f}× faster whole-process; {report.megatron_documents:,} documents {same}"
    return table


@bench_app.command("train")
@stage
def bench_train_command(
    config: Annotated[Path, typer.Argument(help="Run YAML (model: and train:), e.g. configs/tinyllama-1.1b.yaml.")],
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel size.")] = 1,
    pp: Annotated[int, typer.Option("--pp", help="Pipeline-parallel size.")] = 1,
    dp: Annotated[int, typer.Option("--dp", help="Data-parallel size.")] = 1,
    steps: Annotated[int, typer.Option("--steps", help="Steps per run (each arm, each round).")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="First steps of each run left out of the timing.")] = 2,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override train.KEY=VALUE / model.KEY=VALUE (both arms).")] = None,
    peak_tflops: Annotated[Optional[float], typer.Option(help="Peak TFLOP/s per device for MFU (default 989 on GPU).")] = None,
    select_ratio: Annotated[Optional[float], typer.Option("--select-ratio", help="Compare: arm B trains selectively (synthetic scores), keeping this fraction.")] = None,
    reference_online: Annotated[bool, typer.Option("--reference-online", help="Compare SLM with its reference losses from a score store (A) and from the reference model run online (B, the model's shape), at --select-ratio (default 0.6).")] = False,
    vs_set: Annotated[Optional[list[str]], typer.Option("--vs-set", help="Compare: arm B also gets this KEY=VALUE override; repeat.")] = None,
    vs_source: Annotated[Optional[Path], typer.Option("--vs-source", help="Compare: arm B runs the rho source tree in DIR (e.g. a git worktree of an older commit).")] = None,
    alternate: Annotated[str, typer.Option("--alternate", help="Compare by turns of one step (both arms in memory at once) or of whole runs (one at a time; --vs-source).")] = "step",
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="Comparisons: fresh runs per arm, one ratio each. [default: 30]")] = None,
) -> None:
    """Step time, tokens/s and MFU of rho train on synthetic data (no checkpoints); with --select-ratio,
    --vs-set or --vs-source, arm B's step time over arm A's as a paired median ratio."""
    from rhocli.core.errors import MissingInputError, UsageError
    from rhocli.train.bench import Arm, run_bench_train

    comparing = select_ratio is not None or bool(vs_set) or vs_source is not None or reference_online
    if alternate not in ("step", "run"):
        raise UsageError(f"--alternate: expected step or run, got {alternate!r}")
    if vs_source is not None and alternate == "step":
        alternate = "run"  # another checkout's rho cannot take turns; whole runs it is
    rounds = rounds if rounds is not None else (30 if comparing else 1)
    if rounds < 1 or steps < 1 or warmup < 0:
        raise UsageError("--rounds and --steps must be >= 1, --warmup >= 0")
    if warmup >= steps:
        raise UsageError(f"--warmup {warmup} leaves none of --steps {steps} to time")
    if select_ratio is not None and not 0 < select_ratio <= 1:
        raise UsageError(f"--select-ratio {select_ratio}: expected a fraction in (0, 1]")
    if vs_source is not None and not (vs_source / "rhocli" / "__main__.py").is_file():
        raise MissingInputError(f"--vs-source {vs_source}: not a rho source tree (no rhocli/__main__.py)")
    arms = [Arm("A: plain")]
    if reference_online:
        if vs_set or vs_source is not None:
            raise UsageError("--reference-online compares two selective arms; it takes no --vs-set or --vs-source")
        ratio = select_ratio if select_ratio is not None else 0.6
        arms = [Arm(f"A: SLM {ratio:g}, score store", select_ratio=ratio),
                Arm(f"B: SLM {ratio:g}, reference online", select_ratio=ratio, reference_online=True)]
    elif comparing:
        what = [f"selective {select_ratio:g}" if select_ratio is not None else "", *(vs_set or []),
                f"rho at {vs_source}" if vs_source is not None else ""]
        arms.append(Arm("B: " + ", ".join(w for w in what if w), tuple(vs_set or ()),
                        vs_source.resolve() if vs_source is not None else None, select_ratio))
    result = run_bench_train(config, tp, pp, dp, steps, warmup, list(set_ or []), peak_tflops, arms, rounds, alternate)
    out.print(_train_table(result.reports))
    if result.comparison is not None:
        design = (f"{result.rounds} rounds x {steps - warmup} steps, "
                  + ("taking turns step by step" if alternate == "step" else "runs in ABBA order"))
        out.print(_comparison_line(result.comparison, design))


def _train_table(reports):
    from rich.table import Table

    r = reports[0]
    t = Table(title=f"rho bench train: {lit(r.config)} ({r.layout}, {lit(r.device)})", show_header=len(reports) > 1,
              title_justify="left")
    t.add_column(style="bold")
    for rep in reports:
        t.add_column(lit(rep.arm) if len(reports) > 1 else "", justify="right")

    def row(name, fmt):
        t.add_row(name, *[fmt(rep) for rep in reports])

    row("parameters", lambda x: f"{x.parameters:,}")
    row("tokens / step", lambda x: f"{x.tokens_per_step:,}")
    row("step time (median)", lambda x: f"{x.step_time_s * 1000:.1f} ms over {x.steps_measured} steps")
    row("tokens/s", lambda x: f"{x.tokens_per_s:,.0f}  ({x.tokens_per_s_per_device:,.0f} per device)")
    row("model TFLOP/s per device", lambda x: f"{x.tflops_per_device:.2f}")
    row("MFU", lambda x: f"{x.mfu * 100:.1f} %" if x.mfu is not None else "n/a (pass --peak-tflops)")
    row("peak memory (rank 0)", lambda x: f"{x.peak_memory_bytes / 2**20:,.0f} MiB" if x.peak_memory_bytes else "-")
    return t


def _comparison_line(c, design: str) -> str:
    pct = lambda x: f"{(x - 1) * 100:+.1f} %"  # noqa: E731
    text = f"B / A step time: {pct(c.median)} (paired median of {design}); quartiles {pct(c.q1)} .. {pct(c.q3)}"
    text += "\nper round: " + " ".join(pct(r) for r in c.ratios)
    if c.ci_coverage is None:
        return text + "\nno confidence interval below 6 rounds (--rounds)"
    verdict = ("no difference resolved" if c.ci_low <= 1 <= c.ci_high
               else "B is slower" if c.ci_low > 1 else "B is faster")
    return text + f"\n{c.ci_coverage * 100:.1f} % CI {pct(c.ci_low)} .. {pct(c.ci_high)}: {verdict}"


@bench_app.command("kernel")
@stage
def bench_kernel_command(
    shapes: Annotated[Optional[list[str]], typer.Option("--shape", help="TOKENSxVOCAB; repeat. [default: 2048x32000, 8192x32000, 32768x32000]")] = None,
    impl: Annotated[Optional[list[str]], typer.Option("--impl", help="eager, torch, cpu, cpu-inplace, megatron, cuda, cuda-inplace (default: all available).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16 (default float32 on CPU).")] = "float32",
    reps: Annotated[int, typer.Option(help="Timed repetitions (median reported) after one warm-up.")] = 3,
) -> None:
    """Forward+backward time and peak extra memory of the fused selective loss vs eager PyTorch."""
    from rich.table import Table

    from rhocli.bench.kernel import DEFAULT_SHAPES, available_impls, copy_bandwidth_gbs, measure
    from rhocli.core.errors import UsageError

    parsed = []
    for text in shapes or [f"{t}x{v}" for t, v in DEFAULT_SHAPES]:
        try:
            t, v = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise UsageError(f"--shape {text}: expected TOKENSxVOCAB, e.g. 8192x32000") from None
        parsed.append((t, v))
    impls = impl or available_impls()
    bandwidth = copy_bandwidth_gbs()
    if bandwidth:
        out.print(f"device copy bandwidth: {bandwidth:,.0f} GB/s (read + write)")
    table = Table(title=f"rho bench kernel ({dtype})", title_justify="left")
    for col in ("shape", "impl", "fwd+bwd", "vs eager", "peak extra memory", "effective GB/s"):
        table.add_column(col, justify="left" if col in ("shape", "impl") else "right")
    for tokens, vocab in parsed:
        eager_s = None
        for name in impls:
            r = measure(name, tokens, vocab, dtype, reps)
            if name == "eager":
                eager_s = r.seconds
            if r.seconds is None:
                table.add_row(f"{tokens}x{vocab}", name, "failed", "", "", lit(r.error or ""))
                continue
            speed = f"{eager_s / r.seconds:.2f}x" if eager_s else ""
            itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
            gbs = 3 * itemsize * tokens * vocab / r.seconds / 1e9
            table.add_row(f"{tokens}x{vocab}", name, f"{r.seconds * 1000:,.1f} ms", speed,
                          human_bytes(r.peak_extra_bytes), f"{gbs:,.0f}")
    out.print(table)


@bench_app.command("score")
@stage
def bench_score_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help="rho checkpoint (run or step directory).")],
    data: Annotated[str, typer.Option("--data", help="Token dataset; its first --documents documents are scored.")],
    documents: Annotated[int, typer.Option(help="Documents to score.")] = 500,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Window.")] = 128,
    stride: Annotated[int, typer.Option("--stride", help="Sliding-window stride.")] = 64,
    micro_batch_size: Annotated[Optional[int], typer.Option("--micro-batch-size", help="Windows per forward, rho and the batched transformers loop (default: rho score's).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each side, alternating; the best is kept.")] = 2,
) -> None:
    """Tokens/s of rho score vs a transformers forward loop with the same weights and windows."""
    from rhocli.core.errors import UsageError
    from rhocli.score.bench import run_bench_score

    if repeats < 1 or (micro_batch_size is not None and micro_batch_size < 1):
        raise UsageError("--repeats and --micro-batch-size must be >= 1")
    report = run_bench_score(model, data, documents, seq_len, stride, micro_batch_size, [], ctx.find_root().obj,
                             repeats=repeats)
    out.print(_score_table(report))


def _score_table(r):
    from rich.table import Table

    t = Table(title="rho bench score", title_justify="left")
    for c in ("run", "seconds", "tokens/s", "max |diff| vs rho"):
        t.add_column(c, justify="left" if c == "run" else "right")
    t.add_row("rho score (whole process)", f"{r.rho_s:.2f}", f"{r.tokens / r.rho_s:,.0f}", "")
    for name, (secs, diff) in r.transformers.items():
        t.add_row(f"transformers: {name}", f"{secs:.2f}", f"{r.tokens / secs:,.0f}", f"{diff:.1e}")
    t.caption = (f"{r.tokens:,} tokens; rho {r.speedup:.2f}x the faster transformers loop "
                 f"(loop alone, model loaded); micro-batch {r.micro_batch_size}; best of {r.repeats}")
    return t
