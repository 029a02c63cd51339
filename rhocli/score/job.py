"""What a ``rho score`` rank is given: the engine's part and where its output goes."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ScoreJob:
    """Everything a rank needs (a plain dict crosses into spawned workers: ``to_dict``/``from_dict``)."""

    #: the engine's part (parallel.scorer.ScoreSpec)
    engine: Any
    output: str
    model_format: str
    model_path: str
    #: the score store manifest's fields known before scoring
    manifest_fields: dict[str, Any]
    #: what the scores depend on; an unfinished run resumes only with the same (ScoreStoreWriter)
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoreJob":
        from parallel.config import ModelConfig
        from parallel.scorer import ScoreSpec

        engine = dict(d["engine"])
        engine["model"] = ModelConfig(**engine["model"])
        return cls(**{**d, "engine": ScoreSpec(**engine)})
