"""The public corpora the experiments read (``../shared/data``): WikiText-2 paragraphs, GSM8K
problems as training text or as tool-integrated (ToRA-style) solutions, and a jsonl writer for the
documents handed to ``rho tokenize``."""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path


def wikitext_paragraphs(path: Path) -> list[str]:
    """WikiText-2 paragraphs: non-empty lines that are not ' = Heading = ' lines."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text and not (text.startswith("=") and text.endswith("=")):
            out.append(text)
    return out


def gsm8k_text(record: dict) -> str:
    """A GSM8K problem as one training document: the question, then the worked answer."""
    return record["question"] + "\n" + record["answer"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


_ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]*)>>")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def arithmetic(expression: str) -> int | float:
    """The value of a pure arithmetic expression (numbers, + - * / // % **, brackets), computed as
    Python does without running anything; ValueError for anything else."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    try:
        return value(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ZeroDivisionError, OverflowError, RecursionError) as err:
        raise ValueError(str(err)) from None


def gsm8k_tora(record: dict) -> dict | None:
    """A GSM8K problem as a tool-integrated solution in ToRA's shape: the worked reasoning, a python
    program with one line per calculator annotation (``<<48/2=24>>``), the program's printed result in
    an ```output block (what ``print`` shows for the last line's value), and the boxed answer.
    None when an annotation is not plain arithmetic or the program's result is not the answer."""
    answer, _, final = record["answer"].rpartition("####")
    steps = _ANNOTATION.findall(answer)
    if not steps:
        return None
    try:
        values = [arithmetic(expr) for expr, _ in steps]
    except ValueError:
        return None
    printed = str(values[-1])
    final = final.strip().replace(",", "")
    try:
        if float(printed) != float(final):
            return None
    except ValueError:
        return None
    program = "\n".join([f"step_{i} = {expr.strip()}" for i, (expr, _) in enumerate(steps, 1)] + [f"print(step_{len(steps)})"])
    reasoning = _ANNOTATION.sub("", answer).strip()
    solution = (f"{reasoning}\n```python\n{program}\n```\n```output\n{printed}\n```\n"
                f"The answer is $\\boxed{{{final}}}$.")
    return {"question": record["question"], "solution": solution, "answer": final}
