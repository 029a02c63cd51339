"""``rho analyze selection`` as a library: what selective training keeps, checkpoint by checkpoint
(the paper's Fig. 6: losses of selected and unselected tokens over training; Fig. 14: the tokens
selected at 0 / 33 / 66 / 100 % of training).

Every checkpoint of the run and the reference model score one fixed sample (``analyze.sample``); at
each checkpoint ``rho select`` keeps the top ``ratio`` of each document by the score function (the
checkpoint's scores standing in for the training model's loss: exactly what SLM would keep there),
through the caller's ``run_command``, so the masks are ordinary mask stores
(``OUTPUT/masks/step_N``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

#: the share of training whose selections the token view shows (Fig. 14)
VIEW_POINTS = (0.0, 1 / 3, 2 / 3, 1.0)


@dataclasses.dataclass
class SelectionDynamics:
    steps: list[int]
    ratio: float
    score: str
    kept_fraction: list[float]  # per checkpoint
    selected_loss: list[float]  # mean loss at checkpoint c of the tokens selected at c
    unselected_loss: list[float]
    first_selected_loss: list[float]  # the tokens selected at the first checkpoint, followed over training
    first_unselected_loss: list[float]
    reference_selected_loss: list[float]  # their reference loss (the part of the excess that stays)
    overlap_with_first: list[float]  # |S_c ∩ S_0| / |S_0|

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def selection_dynamics(losses: np.ndarray, reference: np.ndarray, masks: np.ndarray, steps: list[int], ratio: float,
                       score: str) -> SelectionDynamics:
    """``losses: [tokens, checkpoints]``, ``reference: [tokens]``, ``masks: [tokens, checkpoints]`` bool."""
    first = masks[:, 0]

    def mean(values, where):
        return float(values[where].mean()) if where.any() else float("nan")

    columns = range(losses.shape[1])
    return SelectionDynamics(
        steps=list(map(int, steps)), ratio=ratio, score=score,
        kept_fraction=[float(masks[:, c].mean()) for c in columns],
        selected_loss=[mean(losses[:, c], masks[:, c]) for c in columns],
        unselected_loss=[mean(losses[:, c], ~masks[:, c]) for c in columns],
        first_selected_loss=[mean(losses[:, c], first) for c in columns],
        first_unselected_loss=[mean(losses[:, c], ~first) for c in columns],
        reference_selected_loss=[mean(reference, masks[:, c]) for c in columns],
        overlap_with_first=[float((masks[:, c] & first).sum() / max(1, first.sum())) for c in columns],
    )


def selection_of_run(run_dir: Path, data: str, reference_model: str, output: Path, sample_tokens: int, run_command,
                     ratio: float = 0.6, score: str = "excess", force: bool = False, seq_len: int | None = None,
                     on_scored=None) -> tuple[SelectionDynamics, dict[str, Path]]:
    """Score the sample with every checkpoint and the reference model, select at each checkpoint, and
    write ``selection.json`` / ``selection.html`` into ``output``."""
    from rhocli.analyze.dynamics import loss_matrix
    from rhocli.analyze.sample import score_run_checkpoints, score_sample
    from rhocli.core.formats.masks import read_masks
    from rhocli.core.formats.staging import check_outputs_free

    paths = {"json": output / "selection.json", "html": output / "selection.html"}
    check_outputs_free(list(paths.values()), force)
    scored = score_run_checkpoints(run_dir, data, output, sample_tokens, run_command, force, seq_len, on_scored)
    reference = score_sample(reference_model, scored.sample, scored.fingerprint, output / "scores" / "reference",
                             run_command, force, seq_len)
    masks = []
    for step_store in scored.stores:
        mask_prefix = output / "masks" / Path(step_store).name
        mask_prefix.parent.mkdir(parents=True, exist_ok=True)
        run_command(["select", "--scores", reference, "--base-scores", step_store, "--score", score, "--ratio", str(ratio),
                     "--scope", "document", "--output", str(mask_prefix), "--force"])
        masks.append(np.concatenate(read_masks(mask_prefix)))
    losses, lengths, _ = loss_matrix(scored.stores)
    ref_values = loss_matrix([reference])[0][:, 0]
    kept = np.stack(masks, axis=1)  # [tokens, checkpoints]
    result = selection_dynamics(losses, ref_values, kept, scored.steps, ratio, score)
    output.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n")
    paths["html"].write_text(_html(result, _views(scored, lengths, losses, ref_values, kept)), encoding="utf-8")
    return result, paths


def _views(scored, lengths: np.ndarray, losses: np.ndarray, reference: np.ndarray, masks: np.ndarray,
           documents: int = 4) -> str:
    """Fig. 14: the sample's first documents as selected at 0 / 33 / 66 / 100 % of training (kept
    tokens on green; hover: the checkpoint's loss, the reference loss and the excess)."""
    import html

    from rhocli.core.formats.tokens import TokenDataset
    from rhocli.core.tokenizers import display_pieces

    tokens = TokenDataset(scored.sample)
    tokenizer = ((tokens.manifest or {}).get("tokenizer") or {}).get("path")
    ends = np.concatenate([[0], np.cumsum(lengths)])
    columns = sorted({round(p * (len(scored.steps) - 1)) for p in VIEW_POINTS})
    parts = []
    for c in columns:
        share = 0 if len(scored.steps) == 1 else c / (len(scored.steps) - 1)
        parts.append(f"<h3>step {scored.steps[c]} ({share:.0%} of training)</h3>")
        for d in range(min(documents, len(lengths))):
            a, b = int(ends[d]), int(ends[d + 1])
            spans = []
            for piece, kept, loss, ref in zip(display_pieces(tokenizer, tokens.document(d).tolist()), masks[a:b, c],
                                              losses[a:b, c], reference[a:b]):
                tip = f"loss {loss:.2f} - reference {ref:.2f} = {loss - ref:+.2f}; {'kept' if kept else 'dropped'}"
                style = "background:#c8f0c8" if kept else "color:#999"
                spans.append(f'<span style="{style}" title="{html.escape(tip)}">{html.escape(piece)}</span>')
            parts.append(f"<p class='doc'>{''.join(spans)}</p>")
    return "\n".join(parts)


def _html(r: SelectionDynamics, views: str) -> str:
    from rhocli.core.plots import line_chart

    curves = line_chart({"selected at each checkpoint": list(zip(r.steps, r.selected_loss)),
                         "unselected at each checkpoint": list(zip(r.steps, r.unselected_loss)),
                         "selected at the first checkpoint": list(zip(r.steps, r.first_selected_loss)),
                         "unselected at the first checkpoint": list(zip(r.steps, r.first_unselected_loss))},
                        "loss of selected and unselected tokens (Fig. 6)", "step", "loss (nats)",
                        styles={"selected at the first checkpoint": "dashed", "unselected at the first checkpoint": "dashed"})
    overlap = line_chart({"share of the first checkpoint's selection still selected": list(zip(r.steps, r.overlap_with_first))},
                         "how the selection moves", "step", "fraction", y_range=(0.0, 1.0))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>rho analyze selection</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}} .doc span{{white-space:pre-wrap}}</style>
</head><body><h1>What selection keeps over training</h1>
<p>At each checkpoint, the top {r.ratio:.0%} of each document of the sample by <b>{r.score}</b> (the
checkpoint's loss against the reference model's), as selective training would keep them there.</p>
{curves}
{overlap}
<h2>Selected tokens over training (Fig. 14)</h2>
{views}
</body></html>
"""
