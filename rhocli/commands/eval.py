"""``rho eval``: few-shot GSM8K / MATH accuracy by greedy generation, the way Rho-1 measures it
(math-evaluation-harness's prompts, extraction and output schema; docs/eval.md).

CPU (a tiny model, a few problems):

    rho eval runs/slm --task gsm8k --data gsm8k_test.jsonl --prompt cot --limit 20 --output out/eval-slm
    rho eval --regrade outputs/test_cot_-1_seed0_t0.0_s0_e-1.jsonl --task math      # no model needed

One GPU (a rho checkpoint of any TP/PP is exported on the fly; a HF directory is used as it is):

    rho eval runs/tinyllama-slm --task math --data math500.jsonl --prompt cot --output out/math-cot
    rho eval hf/rho-math-1b-interpreter --task math --data math500.jsonl --prompt tora --output out/tora

Several GPUs: generation is one process; vLLM splits the model over GPUs with ``--tp`` (not torchrun):

    rho eval hf/rho-math-7b --task math --data math500.jsonl --prompt cot --backend vllm --tp 4 -o out/7b
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rhocli.commands.console import lit, out


class EvalRenderer:
    """Progress (problems/s, accuracy so far, ETA) and nothing else; the summary is printed after."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._progress = None
        self._task = None
        self._correct = 0

    def __call__(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        if event["event"] == "start":
            note = f" ({event['resumed']} already in the output: resuming)" if event["resumed"] else ""
            out.print(f"evaluating {event['total']} problems{note}")
            if out.is_terminal and event["todo"]:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self._progress = Progress(TextColumn("[bold]eval[/]"), BarColumn(), MofNCompleteColumn(),
                                          TextColumn("{task.fields[rate]} problems/s  acc {task.fields[acc]}"),
                                          TimeRemainingColumn(), console=out)
                self._progress.start()
                self._task = self._progress.add_task("eval", total=event["total"], completed=event["resumed"],
                                                     rate="-", acc="-")
        elif event["event"] == "progress":
            self._correct += event["correct"]
            rate = event["generated"] / event["elapsed_s"] if event["elapsed_s"] > 0 else 0.0
            acc = f"{100.0 * self._correct / event['generated']:.1f} %"
            if self._progress is not None:
                self._progress.update(self._task, completed=event["done"], rate=f"{rate:.2f}", acc=acc)
            else:
                left = (event["total"] - event["done"]) / rate if rate > 0 else 0.0
                out.print(f"{event['done']}/{event['total']} problems  {rate:.2f} problems/s  acc {acc}  "
                          f"ETA {int(left // 60)}:{int(left % 60):02d}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def render_summary(metrics: dict[str, Any], title: str, output: Path | None) -> None:
    from rich.table import Table

    out.print(f"[bold]{title}[/]", soft_wrap=True)
    table = Table(show_header=True)
    table.add_column("problems", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("no answer", justify="right")
    table.add_column("timeouts", justify="right")
    table.add_row(str(metrics["num_samples"]), f"{metrics['acc']:.1f} %", str(metrics["empty_samples"]),
                  str(metrics["timeout_samples"]))
    out.print(table)
    for key, label in (("level_acc", "level"), ("type_acc", "subject")):
        if metrics.get(key):
            by = Table(show_header=True)
            by.add_column(label)
            by.add_column("problems", justify="right")
            by.add_column("accuracy", justify="right")
            for name, row in metrics[key].items():
                by.add_row(lit(name), str(row["num_samples"]), f"{row['acc']:.1f} %")
            out.print(by)
    if output is not None:
        out.print(f"[green]wrote[/] {lit(output)}/outputs.jsonl and metrics.json")


def eval_command(
    model: Annotated[Optional[str], typer.Argument(help="A rho checkpoint (run or step directory, any TP/PP) or a Hugging Face model directory.")] = None,
    task: Annotated[str, typer.Option("--task", help="gsm8k or math: the answer format and the prompts.")] = "gsm8k",
    data: Annotated[Optional[str], typer.Option("--data", help="Problems: a local jsonl (GSM8K: question/answer '#### N'; MATH: problem/solution with \\boxed{}).")] = None,
    prompt: Annotated[str, typer.Option("--prompt", help="cot, direct, pal, tool-integrated (few-shot ToRA), tora (the interpreter models' chat format), or a prompt .yaml.")] = "cot",
    shots: Annotated[Optional[int], typer.Option("--shots", help="Exemplars to show (default: all of the prompt's: GSM8K 8, MATH 4).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Directory for outputs.jsonl, metrics.json, settings.json.")] = None,
    question_key: Annotated[Optional[str], typer.Option("--question-key", help="The data's question field (default: question / problem).")] = None,
    answer_key: Annotated[Optional[str], typer.Option("--answer-key", help="The data's answer field (default: answer / solution).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N problems.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated per call (the harness: 1024).")] = 1024,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Problems generated together (transformers backend).")] = 16,
    backend: Annotated[str, typer.Option("--backend", help="transformers (CPU/GPU) or vllm (GPU).")] = "transformers",
    tp: Annotated[int, typer.Option("--tp", help="vLLM: GPUs the model is split over (tensor parallel).")] = 1,
    device: Annotated[str, typer.Option("--device", help="transformers: auto, cpu or cuda.")] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on the CPU).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="A rho checkpoint's tokenizer file, when its data's is not found.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="pal/tora: wall-clock seconds per program.")] = 5.0,
    memory_mb: Annotated[int, typer.Option("--memory-mb", help="pal/tora: memory per program (MB).")] = 1024,
    unsafe_no_isolation: Annotated[bool, typer.Option("--unsafe-no-isolation", help="pal/tora: where bubblewrap cannot isolate the generated programs, run them anyway, without operating-system isolation (unsafe: a program can reach this machine).")] = False,
    regrade: Annotated[Optional[str], typer.Option("--regrade", help="Re-grade this outputs jsonl (the harness's schema) instead of generating.")] = None,
    lm_eval: Annotated[Optional[str], typer.Option("--lm-eval", help="Run lm-evaluation-harness tasks (comma-separated) on MODEL instead (pip install 'rho\\[eval]').")] = None,
    include_path: Annotated[Optional[str], typer.Option("--include-path", help="--lm-eval: a directory of local task YAMLs.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="--lm-eval: exemplars per task.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an output directory that holds another eval.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Evaluate a model on GSM8K / MATH by generation (chain of thought, PAL, tool-integrated)."""
    from rhocli.core.errors import UsageError
    from rhocli.core.megatron_io import quiet_megatron
    from rhocli.eval.job import EvalOptions, evaluate, regrade_file, run_lm_eval_tasks

    quiet_megatron()

    if regrade is not None:
        if model is not None or lm_eval is not None:
            raise UsageError("--regrade: takes no MODEL (it re-grades the generations in the file)")
        result = regrade_file(regrade, task, Path(output) if output else None, force)
        render_summary(result["metrics"], f"{lit(regrade)}: re-graded ({task})", Path(output) if output else None)
        if result["agreement"] is not None:
            agree, differ = result["agreement"]
            out.print(f"agreement with the file's own scores: {agree:.1f} % ({len(differ)} of "
                      f"{result['metrics']['num_samples']} differ: idx {', '.join(str(r['idx']) for r in differ[:20])}"
                      f"{' …' if len(differ) > 20 else ''})")
        return
    if model is None:
        raise UsageError("MODEL: missing (a rho checkpoint or a Hugging Face model directory), or pass --regrade FILE")
    if output is None:
        raise UsageError("--output: missing (the directory for outputs.jsonl and metrics.json)")
    from rhocli.convert.hf import export_hf

    if lm_eval is not None:
        result = run_lm_eval_tasks(model, lm_eval, Path(output), export_hf, include_path, num_fewshot, limit,
                                   device, dtype, tokenizer, batch_size, force)
        for name, row in result["results"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
            out.print(f"{lit(name)}: {lit(shown)}")
        out.print(f"[green]wrote[/] {lit(result['output'])}")
        return
    if data is None:
        raise UsageError("--data: missing (a local jsonl of problems)")
    options = EvalOptions(model=model, task=task, data=data, prompt=prompt, shots=shots, output=Path(output),
                          question_key=question_key, answer_key=answer_key, limit=limit,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, backend=backend, tp=tp,
                          device=device, dtype=dtype, tokenizer=tokenizer, timeout_s=timeout,
                          memory_mb=memory_mb, force=force, unsafe_no_isolation=unsafe_no_isolation)
    renderer = EvalRenderer(quiet)
    try:
        metrics = evaluate(options, export_hf, renderer)
    finally:
        renderer.close()
    s = metrics["settings"]
    shown = Path(s["model"])
    shown = f"{shown.parent.name}/{shown.name}" if s["model_format"] == "rho" else shown.name
    render_summary(metrics, f"{lit(s['task'])} · {lit(s['prompt'])} · {s['shots']}-shot · {lit(shown)}",
                   Path(output))
