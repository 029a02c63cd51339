"""``RUN/metrics.jsonl``: one JSON object per logged step (and per evaluation), appended as training
goes; the fields are listed in docs/train.md. ``MetricsLog`` is the sink the engine writes through;
``read_metrics`` gives a run's curves back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_NAME

    def append(self, record: dict[str, Any]) -> None:
        """One record; a NaN or infinite number is written as null (JSON has no NaN)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(finite, allow_nan=False) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records a killed run logged after the checkpoint of ``step`` (resume)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def read_metrics(run_dir: str | Path) -> dict[str, list]:
    """A run's curves: validation [(step, loss)], training loss [(step, loss)], kept fraction per step."""
    valid, train, kept = [], [], []
    with open(Path(run_dir) / METRICS_NAME, encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            if m.get("valid_loss") is not None:
                valid.append((int(m["step"]), float(m["valid_loss"])))
            if m.get("loss") is not None:
                train.append((int(m["step"]), float(m["loss"])))
            if m.get("kept_fraction") is not None:
                kept.append(float(m["kept_fraction"]))
    return {"valid": valid, "train": train, "kept_fraction": kept}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which ``curve`` (step, loss) reaches ``target``, interpolated between points."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            if l0 <= target or math.isclose(l0, l1):
                return float(s0 if l0 <= target else s1)
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    if curve and curve[0][1] <= target:
        return float(curve[0][0])
    return None
