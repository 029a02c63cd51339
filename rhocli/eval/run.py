"""The eval loop: prompts -> greedy generations (-> executed programs -> continued generations) ->
extracted answers -> verdicts, one ``outputs.jsonl`` line per problem as batches finish, then
``metrics.json``.

Resumable the way math-evaluation-harness is: an interrupted eval, run again with the same settings,
keeps the problems already in ``outputs.jsonl`` and generates the others. Other settings in the same
directory are refused (``--force`` starts over).

The generator and the sandbox come in as arguments (``generation.TransformersGenerator`` /
``VLLMGenerator``, ``sandbox.Sandbox``), so the loop is tested with the real ones and knows neither.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from rhocli.core.errors import OutputExistsError
from rhocli.eval.accuracy import grade, metrics_of
from rhocli.eval.generation import Completion
from rhocli.eval.programs import executed_blocks, output_text, pal_program, tora_program
from rhocli.eval.tasks import Problem, Prompt

MAX_CALLS_NOTE = "\nReach max function call limit."  # the harness's words when the last round still wanted a program


class Generator(Protocol):
    def generate(self, prompts: list[str], stop: tuple[str, ...], max_new_tokens: int) -> list[Completion]: ...


class Executor(Protocol):
    def run_many(self, programs: list[str]) -> list[Any]: ...


@dataclasses.dataclass(frozen=True)
class EvalJob:
    problems: list[Problem]
    prompt: Prompt
    output: Path
    max_new_tokens: int
    batch_size: int
    settings: dict[str, Any]  # what makes two evals the same (model, data, task, prompt, shots, limits)
    force: bool = False


def prepare_output(job: EvalJob) -> set:
    """Create or reopen the output directory; the idxs already evaluated there (a resumed eval)."""
    from rhocli.core.formats.eval_outputs import (METRICS_NAME, OUTPUTS_NAME, SETTINGS_NAME, read_json,
                                                  read_outputs, write_json)

    out = job.output
    outputs, settings_path = out / OUTPUTS_NAME, out / SETTINGS_NAME
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--output {out}: exists and is not a directory")
    previous = read_json(settings_path)
    if job.force:
        for name in (OUTPUTS_NAME, METRICS_NAME, SETTINGS_NAME):
            (out / name).unlink(missing_ok=True)
        previous = None
    elif previous is not None and previous != job.settings:
        changed = sorted(k for k in set(previous) | set(job.settings) if previous.get(k) != job.settings.get(k))
        raise OutputExistsError(f"--output {out}: holds an eval with other settings ({', '.join(changed)}); "
                                "pass --force to replace it")
    elif previous is None and outputs.exists():
        raise OutputExistsError(f"--output {out}: has an outputs.jsonl of unknown settings; pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    write_json(settings_path, job.settings)
    return {r.get("idx") for r in read_outputs(outputs)} if outputs.exists() else set()


def run_eval(job: EvalJob, generator: Generator, executor: Executor | None,
             on_event: Callable[[dict], None] = lambda e: None) -> dict[str, Any]:
    """Evaluate ``job.problems`` (see the module docstring); returns the metrics written."""
    from rhocli.core.formats.eval_outputs import METRICS_NAME, OUTPUTS_NAME, OutputsWriter, read_outputs, write_json

    done = prepare_output(job)
    writer = OutputsWriter(job.output)
    todo = [p for p in job.problems if p.idx not in done]
    total = len(job.problems)
    on_event({"event": "start", "total": total, "resumed": total - len(todo), "todo": len(todo)})
    start = time.perf_counter()
    finished = 0
    for first in range(0, len(todo), job.batch_size):
        batch = todo[first:first + job.batch_size]
        records = solve(batch, job.prompt, generator, executor, job.max_new_tokens)
        writer.append(records)
        finished += len(batch)
        on_event({"event": "progress", "done": total - len(todo) + finished, "total": total,
                  "elapsed_s": time.perf_counter() - start, "generated": finished,
                  "correct": sum(bool(r["score"][0]) for r in records)})
    wanted = {p.idx for p in job.problems}
    by_idx = {r["idx"]: r for r in read_outputs(job.output / OUTPUTS_NAME) if r.get("idx") in wanted}
    records = [by_idx[p.idx] for p in job.problems if p.idx in by_idx]
    metrics = {**metrics_of(records), "time_s": round(time.perf_counter() - start, 1), "settings": job.settings}
    write_json(job.output / METRICS_NAME, metrics)
    return metrics


def solve(batch: list[Problem], prompt: Prompt, generator: Generator, executor: Executor | None,
          max_new_tokens: int) -> list[dict[str, Any]]:
    """The graded records of one batch of problems."""
    prompts = [prompt.render(p.question) for p in batch]
    texts, reports = [""] * len(batch), [None] * len(batch)
    active = list(range(len(batch)))
    for round_ in range(prompt.rounds):
        completions = generator.generate([prompts[i] + texts[i] for i in active], prompt.stop, max_new_tokens)
        programs, waiting = [], []
        for i, completion in zip(active, completions):
            out = completion.text.rstrip()
            texts[i] += out
            program = _program_for(prompt.style, texts[i], out)
            if program is not None:
                programs.append(program)
                waiting.append(i)
        if not programs or executor is None:
            break
        for i, execution in zip(waiting, executor.run_many(programs)):
            result = output_text(execution)
            reports[i] = execution.error
            if prompt.style == "pal":  # the program's value is the answer
                result = "\\boxed{" + result + "}"
            texts[i] += f"\n```output\n{result}\n```\n"
            if round_ == prompt.rounds - 1 and prompt.style != "pal":
                texts[i] += MAX_CALLS_NOTE
        active = [i for i in waiting if prompt.style != "pal"]
        if not active:
            break
    records = []
    for problem, text, report in zip(batch, texts, reports):
        record = {"idx": problem.idx, "question": problem.question, "code": [text.strip()], "report": [report],
                  **problem.extra}
        records.append(grade(record, problem.reference))
    return records


def _program_for(style: str, text: str, out: str) -> str | None:
    """The program a generation wants run now, or None (see ``programs``)."""
    if style == "pal":
        return pal_program(text)
    if style in ("tora", "tool-integrated") and "boxed" not in out and out.endswith("```"):
        blocks = text.rsplit("```python\n", 1)
        if len(blocks) == 2:
            block = blocks[1][: blocks[1].rfind("```")]
            return tora_program(executed_blocks(blocks[0]), block)
    return None
