"""Grading a generation: which answer it gives (``extract_answer``) and whether that answer is the
reference's (``equivalent``).

Extraction follows the rules math-evaluation-harness applies (the harness that produced every Rho-1
number), in its order, so that a rho accuracy and a paper accuracy measure the same thing:

1. Minerva's closing line, "The final answer is $X$. I hope it is correct." -> X;
2. else the argument of the last ``\\boxed{...}`` (balanced braces; ``\\boxed 5`` up to the next ``$``);
3. else what follows the last "he answer is" (GSM8K's "The answer is 18."), then "final answer is";
4. else the last number in the text (commas dropped).

Then one newline-joined line, a leading ``:`` and a trailing ``.`` or ``/`` removed.

``normalize`` drops the notation that does not change a value (``\\left``/``\\right``, ``\\dfrac``,
degrees, ``\\$``, ``%``, units in ``\\text{}`` at the end, ``x =`` in front, spaces). It also removes
spaces *inside* words, as the harness does: "The answer is 72. I hope it is correct." extracts
"72. I hope it is correct" (rule 3) and normalizes to "72Ihopeitiscorrect", which matches nothing.
That is the harness's verdict on such lines, kept so that accuracies compare (docs/eval.md lists the
released generations where it matters).

Equivalence is decided by ``math-verify`` (Hugging Face's maintained LaTeX/expression parser and
sympy comparison), after an exact match of the normalized strings; rho writes no LaTeX parser.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d*\.?\d+")


def extract_answer(text: str) -> str:
    """The answer a generation gives, by the rules in the module docstring ('' when none)."""
    if "final answer is $" in text and "$. I hope" in text:
        answer = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
    elif "boxed" in text:
        answer = _after_last_boxed(text)
    elif "he answer is" in text:
        answer = text.split("he answer is")[-1].strip()
    elif "final answer is" in text:
        answer = text.split("final answer is")[-1].strip()
    else:
        numbers = _NUMBER.findall(text.replace(",", ""))
        answer = numbers[-1] if numbers else ""
    answer = re.sub(r"\n\s*", "", answer)
    if answer.startswith(":"):
        answer = answer[1:]
    if answer.endswith(".") or answer.endswith("/"):
        answer = answer[:-1]
    return answer


def _after_last_boxed(text: str) -> str:
    """The argument of the last ``boxed``: the balanced ``{...}``, or the text up to the next ``$``."""
    rest = text.split("boxed")[-1]
    if not rest.startswith("{"):
        return rest.split("$")[0].strip()
    depth, out = 0, []
    for ch in rest:
        if ch == "{":
            depth += 1
            if depth == 1:
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                break
        out.append(ch)
    return "".join(out)


def last_boxed(text: str) -> str | None:
    """The argument of the last ``\\boxed{...}`` in a reference solution (MATH's ``solution``), or None."""
    if "\\boxed" not in text:
        return None
    return _after_last_boxed(text[text.rindex("\\boxed"):])


def gsm8k_reference(answer: str) -> str:
    """GSM8K's reference answer: what follows ``####``, commas dropped ("1,200" -> "1200")."""
    if "####" not in answer:
        raise ValueError("no '#### N' line")
    return answer.split("####")[-1].strip().replace(",", "")


# notation that never changes a value, as (pattern, replacement) applied in order
_DROP = (
    (r"\\!", ""), (r"\\left", ""), (r"\\right", ""), (r"\\\{", "{"), (r"\\\}", "}"),
    (r"tfrac", "frac"), (r"dfrac", "frac"), (r"bmatrix", "pmatrix"),
    (r"\^\{\\circ\}", ""), (r"\^\\circ", ""), (r"\\\$", ""), (r"\$", ""),
    (r"\\%", ""), (r"%", ""), (r"\\mbox\{.*?\}", ""),
)


def normalize(answer: str) -> str:
    """The answer without the notation that does not change its value (see the module docstring)."""
    s = str(answer).strip().replace("\n", "").rstrip(".")
    for pattern, repl in _DROP:
        s = re.sub(pattern, repl, s)
    unitless = re.sub(r"\\text\{.*?\}$", "", s).strip()  # a trailing unit: "5 \text{ cm}" -> "5"
    if unitless:
        s = unitless
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5", "k=2" -> "2"
    s = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", s)  # "5.00 " -> "5 " (a harness rule; also what cuts "72. I")
    s = re.sub(r"(\d+)\.0*$", r"\1", s)
    s = s.replace(" ", "").rstrip(".")  # again: "$-2 + 7i.$" kept its period inside the dollars
    if s.startswith("."):
        s = "0" + s
    return s


def equivalent(prediction: str, reference: str, timeout_s: int = 5) -> bool:
    """Whether ``prediction`` and ``reference`` (both extracted answers) are the same value."""
    pred, ref = normalize(prediction), normalize(reference)
    if not pred:
        return False
    if pred == ref:
        return True
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError as err:  # a declared dependency; reached only in a broken environment
        raise ImportError("math-verify is not installed: pip install 'math-verify[antlr4_13_2]'") from err
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"${ref}$", configs, parsing_timeout=timeout_s)
    target = parse(f"${pred}$", configs, parsing_timeout=timeout_s)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=timeout_s))
