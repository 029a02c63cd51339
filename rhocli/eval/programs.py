"""The programs of program-aided generations, and how their results go back into the text.

ToRA (tool-integrated): the model writes reasoning and `````python`` blocks; each block is executed and
its result appended as an `````output`` block, and generation continues. Like a notebook, a block
sees what earlier blocks defined: the program run for block k is every earlier block whose output
was not an error (their ``print`` lines dropped), the import lines of the failed ones, then block k.
That is what math-evaluation-harness runs, so that the models' recorded outputs are reproduced
(``tests/test_eval_programs.py`` re-runs the released generations).

PAL: the model writes a ``solution()`` function; its return value is the answer.

What goes into the text (``output_text``): the program's stdout, stripped, cut to 400 characters
(first and last 200 around "..."); on an error, the error's one line; "Done" for a program that
printed nothing.
"""

from __future__ import annotations

import re

from rhocli.eval.sandbox import Execution

OUTPUT_CHARS = 400
# an output holding one of these marks its block as failed (its definitions are not carried on)
_FAILURE_WORDS = ("error", "exception", "no algorithms", "cannot", "nan", "...")
_BLOCK = re.compile(r"```python\n(.*?)```\n?```output\n(.*?)```", re.S)


def executed_blocks(generation: str) -> list[tuple[str, str]]:
    """The (program, recorded output) pairs of a ToRA generation, in order."""
    return [(program, output.strip()) for program, output in _BLOCK.findall(generation)]


def tora_program(previous: list[tuple[str, str]], block: str) -> str:
    """The program to run for ``block`` after the executed ``previous`` (program, output) pairs."""
    kept, imports = [], []
    for program, output in previous:
        if _succeeded(output):
            kept.append(program)
        else:
            imports += [line for line in program.split("\n") if line.startswith(("import", "from"))]
    kept.append(block)
    if imports:
        kept[0] = "\n".join(imports) + "\n" + kept[0]
    # earlier blocks printed their results already; only the new block's prints are its output
    earlier = ["\n".join(line for line in p.split("\n") if not line.strip().startswith("print(")) for p in kept[:-1]]
    return "\n".join(earlier + kept[-1:])


def _succeeded(output: str) -> bool:
    lowered = output.lower()
    return not any(word in lowered for word in _FAILURE_WORDS)


def pal_program(generation: str) -> str | None:
    """The PAL program of a generation (its last `````python`` block) with the answer printed, or None."""
    blocks = re.findall(r"```python\n(.*?)```", generation, re.S)
    if not blocks:
        return None
    return blocks[-1] + "\nprint(solution())\n"


def output_text(execution: Execution) -> str:
    """What an execution adds to the text (see the module docstring)."""
    if execution.error is not None:
        return _cut(execution.error.strip())
    out = execution.stdout.strip()
    return _cut(out) if out else "Done"


def _cut(text: str) -> str:
    if len(text) <= OUTPUT_CHARS:
        return text
    half = OUTPUT_CHARS // 2
    return text[:half] + "..." + text[-half:]
