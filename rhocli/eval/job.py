"""``rho eval`` as a library: options checked, model resolved, generator and sandbox built, the loop run
(``evaluate``); re-grading a file (``regrade_file``); lm-evaluation-harness tasks (``run_lm_eval_tasks``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from rhocli.core.errors import BadInputError, NotAvailableError, UsageError
from rhocli.core.formats.hf import DTYPE_NAMES
from rhocli.eval.generation import BACKENDS


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    model: str
    task: str
    data: str
    prompt: str
    output: Path
    shots: int | None = None
    question_key: str | None = None
    answer_key: str | None = None
    limit: int | None = None
    max_new_tokens: int = 1024
    batch_size: int = 16
    backend: str = "transformers"
    tp: int = 1
    device: str = "auto"
    dtype: str | None = None
    tokenizer: str | None = None
    timeout_s: float = 5.0
    memory_mb: int = 1024
    force: bool = False
    #: run generated programs without operating-system isolation where none is available (unsafe)
    unsafe_no_isolation: bool = False


def _check(o: EvalOptions) -> None:
    if o.backend not in BACKENDS:
        raise UsageError(f"--backend: expected {' or '.join(BACKENDS)}, got {o.backend!r}")
    if o.dtype is not None and o.dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype: expected bf16, fp16 or fp32, got {o.dtype!r}")
    for flag, value, least in (("--max-new-tokens", o.max_new_tokens, 1), ("--batch-size", o.batch_size, 1),
                               ("--tp", o.tp, 1), ("--memory-mb", o.memory_mb, 64)):
        if value < least:
            raise UsageError(f"{flag}: must be at least {least}, got {value}")
    if o.limit is not None and o.limit < 1:
        raise UsageError(f"--limit: must be at least 1, got {o.limit}")
    if o.timeout_s <= 0:
        raise UsageError(f"--timeout: must be positive, got {o.timeout_s}")
    if o.tp > 1 and o.backend != "vllm":
        raise UsageError("--tp: tensor-parallel generation needs --backend vllm")


def evaluate(o: EvalOptions, export: Callable[..., dict], on_event: Callable[[dict], None]) -> dict[str, Any]:
    """Run the eval ``o`` describes; returns its metrics (also in ``OUTPUT/metrics.json``)."""
    from rhocli.core.fingerprint import file_sha256
    from rhocli.eval.isolation import choose_isolation
    from rhocli.eval.model import hf_model_dir, model_identity
    from rhocli.eval.run import EvalJob, run_eval
    from rhocli.eval.sandbox import Limits, Sandbox
    from rhocli.eval.tasks import PROGRAM_STYLES, load_problems, load_prompt

    _check(o)
    prompt = load_prompt(o.task, o.prompt, o.shots)
    problems = load_problems(o.data, o.task, o.question_key, o.answer_key)[: o.limit]
    identity = model_identity(o.model)  # checked before anything is loaded or written
    limits = Limits(wall_s=o.timeout_s, cpu_s=max(1, int(o.timeout_s) + 1), memory_mb=o.memory_mb)
    settings = {**identity, "task": o.task, "data": str(Path(o.data).resolve()),
                "data_sha256": file_sha256(Path(o.data)), "prompt": prompt.style, "prompt_file": prompt.source,
                "shots": prompt.shots, "max_new_tokens": o.max_new_tokens, "limit": o.limit,
                "timeout_s": o.timeout_s, "memory_mb": o.memory_mb,
                "question_key": o.question_key, "answer_key": o.answer_key}
    uses_programs = prompt.style in PROGRAM_STYLES
    # programs run only under OS isolation (or the explicit unsafe opt-in): decided before anything is written
    isolation = choose_isolation(o.unsafe_no_isolation) if uses_programs else None
    if isolation is not None:
        settings["isolation"] = isolation.describe()
    job = EvalJob(problems, prompt, o.output, o.max_new_tokens, o.batch_size, settings, o.force)
    o.output.mkdir(parents=True, exist_ok=True)
    with hf_model_dir(o.model, o.output, export, _export_dtype(o), o.tokenizer) as model_dir:
        generator = _generator(o, model_dir)
        if not uses_programs:
            return run_eval(job, generator, None, on_event)
        with Sandbox(limits, workers=2, isolation=isolation) as sandbox:
            return run_eval(job, generator, sandbox, on_event)


def _export_dtype(o: EvalOptions) -> str:
    from rhocli.eval.generation import pick_device, precision_for

    return precision_for(o.dtype, "cuda" if o.backend == "vllm" else pick_device(o.device))


def _generator(o: EvalOptions, model_dir: Path):
    from rhocli.eval.generation import TransformersGenerator, VLLMGenerator

    if o.backend == "vllm":
        return VLLMGenerator(model_dir, o.tp, o.dtype)
    return TransformersGenerator(model_dir, o.device, o.dtype, o.batch_size)


def regrade_file(path: str, task: str, output: Path | None, force: bool) -> dict[str, Any]:
    """Re-grade ``path``; write ``OUTPUT/outputs.jsonl`` and ``metrics.json`` when ``output`` is given."""
    from rhocli.core.errors import OutputExistsError
    from rhocli.core.formats.eval_outputs import METRICS_NAME, OUTPUTS_NAME, OutputsWriter, write_json
    from rhocli.eval.accuracy import agreement, regrade
    from rhocli.eval.tasks import TASKS

    if task not in TASKS:
        raise UsageError(f"--task: expected one of {', '.join(TASKS)}, got {task!r}")
    records, metrics = regrade(path, task)
    if output is not None:
        targets = [output / OUTPUTS_NAME, output / METRICS_NAME]
        if any(t.exists() for t in targets) and not force:
            raise OutputExistsError(f"--output {output}: already holds outputs; pass --force to replace them")
        output.mkdir(parents=True, exist_ok=True)
        for t in targets:
            t.unlink(missing_ok=True)
        OutputsWriter(output).append(records)
        write_json(output / METRICS_NAME, {**metrics, "settings": {"regrade": str(Path(path).resolve()), "task": task}})
    return {"metrics": metrics, "agreement": agreement(records)}


def run_lm_eval_tasks(model: str, tasks: str, output: Path, export: Callable[..., dict], include_path: str | None,
                      num_fewshot: int | None, limit: int | None, device: str, dtype: str | None,
                      tokenizer: str | None, batch_size: int, force: bool) -> dict[str, Any]:
    """lm-evaluation-harness's ``simple_evaluate`` on the model (local task files through
    ``include_path``); its results in ``OUTPUT/lm_eval.json``."""
    import json

    from rhocli.core.errors import MissingInputError, OutputExistsError
    from rhocli.core.formats.eval_outputs import write_json
    from rhocli.eval.generation import pick_device, precision_for
    from rhocli.eval.model import hf_model_dir

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise NotAvailableError("--lm-eval: lm-evaluation-harness is not installed (pip install 'rho[eval]')") from None
    target = output / "lm_eval.json"
    if target.exists() and not force:
        raise OutputExistsError(f"--output {output}: already holds lm_eval.json; pass --force to replace it")
    if include_path is not None and not Path(include_path).is_dir():
        raise MissingInputError(f"--include-path {include_path}: not a directory")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UsageError("--lm-eval: no task names")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UsageError(f"--lm-eval: unknown task(s) {', '.join(unknown)} (local task YAMLs go in --include-path)")
    dev = pick_device(device)
    output.mkdir(parents=True, exist_ok=True)
    precision = precision_for(dtype, dev)
    with hf_model_dir(model, output, export, precision, tokenizer) as model_dir:
        torch_dtype = DTYPE_NAMES[precision]
        try:
            results = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(model_dir), "dtype": torch_dtype},
                tasks=names, num_fewshot=num_fewshot, limit=limit, device=dev, batch_size=batch_size,
                task_manager=manager, log_samples=False,
            )
        except ImportError as err:  # lm-eval's transformers backend needs accelerate / peft
            raise NotAvailableError(f"--lm-eval: {err} (pip install 'rho[eval]')") from None
        except (AssertionError, ValueError) as err:  # lm-eval's checks of a task against the model
            raise BadInputError(f"--lm-eval: lm-evaluation-harness refused the task: {err}") from None
    table = {name: {k: v for k, v in row.items() if k != "alias"} for name, row in results["results"].items()}
    write_json(target, json.loads(json.dumps({"results": table, "configs": results.get("configs", {})}, default=str)))
    return {"results": table, "output": str(target)}
