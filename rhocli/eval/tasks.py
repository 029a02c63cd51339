"""What is evaluated: the problems of a local jsonl file with their reference answers (``load_problems``)
and the prompt that asks them (``load_prompt``, from the data files in ``rhocli/eval/prompts/``).

Data formats: GSM8K's (``question``; ``answer`` ending in ``#### N``) and MATH's (``problem``;
``solution`` with a ``\\boxed{}``, or an ``answer`` field), or any jsonl with ``--question-key`` /
``--answer-key``. An ``idx`` field is kept (else the line's position); MATH's ``level`` and ``type`` too,
for the per-level table.

A prompt file (YAML) holds: ``instruction`` (text before the exemplars), ``exemplars`` (question and
solution), ``exemplar`` (how one is written; default: ``query`` followed by the solution), ``query``
(how the problem is asked), ``separator`` (between exemplars), ``before_query`` (between the last
exemplar and the problem), ``stop`` (stop sequences) and ``rounds`` (programs executed per problem:
1 for PAL, up to 4 for ToRA; 1 for chain of thought, which executes nothing).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rhocli.core.errors import BadInputError, MissingInputError, UsageError
from rhocli.core.formats.eval_outputs import json_objects
from rhocli.eval.grading import gsm8k_reference, last_boxed

TASKS = ("gsm8k", "math")
STYLES = ("cot", "direct", "pal", "tool-integrated", "tora")
PROGRAM_STYLES = ("pal", "tool-integrated", "tora")  # styles whose generations hold executed programs
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_KEYS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}
EXTRA_FIELDS = ("level", "type")


@dataclasses.dataclass(frozen=True)
class Problem:
    idx: Any
    question: str
    reference: str
    extra: dict  # level / type when the data has them


@dataclasses.dataclass(frozen=True)
class Prompt:
    task: str
    style: str
    instruction: str
    query: str
    exemplar: str
    separator: str
    before_query: str
    stop: tuple[str, ...]
    rounds: int
    exemplars: tuple[tuple[str, str], ...]
    shots: int
    source: str

    def render(self, question: str) -> str:
        """The whole prompt for one problem: instruction, ``shots`` exemplars, the question."""
        shown = [self.exemplar.format(question=q, solution=s) for q, s in self.exemplars[: self.shots]]
        query = self.query.format(question=question)
        if not shown:
            return self.instruction + query if self.instruction else query
        return self.instruction + self.separator.join(shown) + self.before_query + query


def load_prompt(task: str, prompt: str, shots: int | None = None) -> Prompt:
    """The prompt ``prompt`` (a style name, or the path of a prompt YAML) for ``task``, with its first
    ``shots`` exemplars (all when None)."""
    import yaml

    if task not in TASKS:
        raise UsageError(f"--task: expected one of {', '.join(TASKS)}, got {task!r}")
    path = Path(prompt) if prompt.endswith((".yaml", ".yml")) else PROMPTS_DIR / f"{task}-{prompt}.yaml"
    if not path.is_file():
        if prompt.endswith((".yaml", ".yml")):
            raise MissingInputError(f"--prompt {prompt}: not found")
        raise UsageError(f"--prompt: expected one of {', '.join(STYLES)} or a prompt .yaml file, got {prompt!r}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        exemplars = tuple((str(e["question"]), str(e["solution"])) for e in data.get("exemplars") or [])
        query = str(data["query"])
        loaded = Prompt(
            task=str(data.get("task", task)), style=str(data.get("style", path.stem)),
            instruction=str(data.get("instruction") or ""), query=query,
            exemplar=str(data.get("exemplar") or query + "{solution}"),
            separator=str(data.get("separator", "\n\n\n")), before_query=str(data.get("before_query", "\n\n\n")),
            stop=tuple(str(s) for s in data.get("stop") or ()), rounds=int(data.get("rounds", 1)),
            exemplars=exemplars, shots=len(exemplars) if shots is None else shots, source=str(path),
        )
        loaded.render("?")  # a template with an unknown {field} fails here, not mid-eval
    except (yaml.YAMLError, KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise BadInputError(f"{path}: not a prompt file ({type(err).__name__}: {err})") from None
    if loaded.task != task:
        raise UsageError(f"--prompt {prompt}: a {loaded.task} prompt, but --task is {task}")
    if shots is not None and not 0 <= shots <= len(exemplars):
        raise UsageError(f"--shots {shots}: {path.name} has {len(exemplars)} exemplars")
    if loaded.rounds < 1:
        raise BadInputError(f"{path}: rounds must be at least 1")
    return loaded


def load_problems(path: str | Path, task: str, question_key: str | None = None,
                  answer_key: str | None = None) -> list[Problem]:
    """The problems of a jsonl file, each with its reference answer; BadInputError names the file and
    line of anything it cannot use."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"--data {path}: not found")
    q_key, a_key = question_key or DEFAULT_KEYS[task][0], answer_key or DEFAULT_KEYS[task][1]
    problems = []
    for number, record in json_objects(path):
        if q_key not in record:
            raise BadInputError(f"{path}:{number}: no {q_key!r} field (pass --question-key)")
        reference = _reference(record, task, a_key, path, number, answer_key is not None)
        extra = {k: record[k] for k in EXTRA_FIELDS if k in record}
        problems.append(Problem(record.get("idx", len(problems)), str(record[q_key]).strip(), reference, extra))
    if not problems:
        raise BadInputError(f"--data {path}: no problems (the file is empty)")
    return problems


def _reference(record: dict, task: str, key: str, path: Path, number: int, key_given: bool) -> str:
    """The reference answer: GSM8K's ``#### N``; MATH's last ``\\boxed{}`` of the solution, else its
    ``answer`` field; a ``--answer-key`` field as it is when it has neither."""
    if key not in record:
        if task == "math" and "answer" in record and not key_given:
            return str(record["answer"]).strip()
        raise BadInputError(f"{path}:{number}: no {key!r} field (pass --answer-key)")
    value = str(record[key])
    if task == "gsm8k":
        if "####" in value:
            return gsm8k_reference(value)
        if key_given:
            return value.strip().replace(",", "")
        raise BadInputError(f"{path}:{number}: the {key!r} field has no '#### N' final answer")
    boxed = last_boxed(value)
    if boxed is not None:
        return boxed
    if "answer" in record and not key_given:
        return str(record["answer"]).strip()
    if key_given:
        return value.strip()
    raise BadInputError(f"{path}:{number}: the {key!r} field has no \\boxed{{}} answer and there is no 'answer' field")


def reference_of(record: dict, task: str) -> str:
    """The reference answer of a record of an outputs file (``--regrade``): from the raw ``solution`` /
    ``answer`` when the record carries them, else its ``gt``. The harness's ``gt`` went through its
    normalization, which can break it: MATH's "(a+5)(b+2)" is stored as "(+5)(b+2)"."""
    if task == "gsm8k" and "####" in str(record.get("answer", "")):
        return gsm8k_reference(str(record["answer"]))
    if task == "math":
        boxed = last_boxed(str(record.get("solution", "")))
        if boxed is not None:
            return boxed
        if record.get("answer") not in (None, ""):
            return str(record["answer"])
    return str(record.get("gt", ""))
