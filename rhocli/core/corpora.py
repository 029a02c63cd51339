"""The public corpora the experiments read (``../shared/data``): WikiText-2 paragraphs, GSM8K
problems as training text, and a jsonl writer for the documents handed to ``rho tokenize``."""

from __future__ import annotations

import json
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
