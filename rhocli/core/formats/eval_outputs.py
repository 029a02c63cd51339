"""``rho eval``'s files, in math-evaluation-harness's schema so that they compare line by line:

* ``DIR/outputs.jsonl``: one JSON object per problem, appended as problems finish: ``idx``, ``question``,
  ``gt`` (the reference answer), ``code`` (a list: the generation, python blocks and their outputs
  included), ``pred`` (a list: the extracted answer), ``report`` (a list: the last execution's error
  line or None), ``score`` (a list of booleans), plus ``level`` / ``type`` when the data has them.
* ``DIR/metrics.json``: ``num_samples``, ``num_scores``, ``acc``, ``empty_samples``, ``timeout_samples``,
  ``level_acc`` / ``type_acc`` (MATH), and what was evaluated (``settings``).
* ``DIR/settings.json``: the settings of the eval that writes ``outputs.jsonl`` (a resumed eval must have
  the same ones).

The harness's released files store ``code``/``pred``/``report``/``score`` either as JSON lists or as the
Python ``repr`` of a list; ``read_outputs`` accepts both. A last line cut short by a kill is ignored
(an interrupted eval is resumed from the complete lines).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any, Iterator

from rhocli.core.errors import BadInputError, MissingInputError

OUTPUTS_NAME = "outputs.jsonl"
METRICS_NAME = "metrics.json"
SETTINGS_NAME = "settings.json"
LIST_FIELDS = ("code", "pred", "report", "score")


def json_objects(path: Path, torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a jsonl file; BadInputError names the line of
    anything else. ``torn_tail``: a last line without its newline that does not parse (a write cut
    short by a kill) is skipped."""
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if torn_tail and number == len(lines):
                return
            raise BadInputError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict):
            raise BadInputError(f"{path}:{number}: not a JSON object")
        yield number, record


def read_outputs(path: str | Path) -> list[dict[str, Any]]:
    """The records of an outputs file, list fields decoded; raises BadInputError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: not found")
    records = []
    for number, record in json_objects(path, torn_tail=True):
        for key in LIST_FIELDS:
            if key in record:
                record[key] = _as_list(record[key], path, number, key)
        records.append(record)
    return records


def _as_list(value: Any, path: Path, number: int, key: str) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.startswith("["):
        try:
            decoded = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise BadInputError(f"{path}:{number}: field {key!r} is neither a list nor a list's repr") from None
        if isinstance(decoded, list):
            return decoded
    return [value]


class OutputsWriter:
    """Appends records to ``DIR/outputs.jsonl``, each flushed to disk before ``append`` returns (a
    killed eval keeps every problem it finished). A resumed eval first calls ``drop_torn_line``."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / OUTPUTS_NAME
        drop_torn_line(directory)

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def drop_torn_line(directory: str | Path) -> None:
    """Cut a last line a kill left unfinished, so that appending continues on a clean file."""
    path = Path(directory) / OUTPUTS_NAME
    if not path.is_file() or path.stat().st_size == 0 or _ends_with_newline(path):
        return
    data = path.read_bytes()
    path.write_bytes(data[: data.rfind(b"\n") + 1])


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """``metrics.json`` / ``settings.json``: written whole (a temporary file renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict[str, Any] | None:
    """``settings.json`` / ``metrics.json``, or None when absent."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise BadInputError(f"{path}: not valid JSON") from None
