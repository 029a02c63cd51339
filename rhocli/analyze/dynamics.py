"""``rho analyze dynamics`` as a library: per-token loss trajectories over a run's checkpoints, sorted
into Rho-1's four categories (§2.1, Fig. 2 and 3; App. D).

Input: one score store per checkpoint (``rho score`` of the same token sample with each checkpoint),
in training order, read as a matrix ``losses: [tokens, checkpoints]``. The rule (``classify``; the
paper's text is recorded in docs/analysis.md):

* a least-squares line through each token's losses against the checkpoints' steps;
  ``change = slope * (last step - first step)``: the fitted change over the run, in nats;
* ``change < -threshold`` -> ``H→L`` (learned); ``change > threshold`` -> ``L→H`` (unlearned);
* otherwise ``L→L`` when the token's final loss is at most the mean final loss of the sample's tokens,
  else ``H→H``.

Fluctuation (Fig. 3): the standard deviation of a token's losses around its fitted line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

#: in the order the paper lists them
CATEGORIES = ("H→H", "L→H", "H→L", "L→L")
#: nats of fitted change over the run that make a token's loss "moving" (the issue's 0.2)
THRESHOLD = 0.2


def fitted_change(losses: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(change [tokens], residual std [tokens]) of a least-squares line through each row of
    ``losses: [tokens, checkpoints]`` against ``steps: [checkpoints]``."""
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    xc = x - x.mean()
    slope = (y - y.mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)
    fit = y.mean(axis=1, keepdims=True) + slope[:, None] * xc[None, :]
    return slope * float(x[-1] - x[0]), (y - fit).std(axis=1)


def classify(losses: np.ndarray, steps: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Each token's category, an index into ``CATEGORIES`` [tokens] (see the module docstring)."""
    if losses.ndim != 2 or losses.shape[1] < 2 or len(steps) != losses.shape[1]:
        raise ValueError("classify needs losses [tokens, checkpoints] with at least two checkpoints and their steps")
    change, _ = fitted_change(losses, steps)
    final = np.asarray(losses, dtype=np.float64)[:, -1]
    low_at_end = final <= final.mean()
    out = np.where(low_at_end, CATEGORIES.index("L→L"), CATEGORIES.index("H→H"))
    out = np.where(change < -threshold, CATEGORIES.index("H→L"), out)
    return np.where(change > threshold, CATEGORIES.index("L→H"), out).astype(np.int8)


@dataclasses.dataclass
class Dynamics:
    """What the report shows: per-category fractions, mean loss per checkpoint, fluctuation."""

    steps: list[int]
    categories: np.ndarray  # [tokens] indices into CATEGORIES
    fractions: dict[str, float]
    mean_loss: dict[str, list[float]]  # category -> [checkpoints]
    fluctuation: dict[str, float]  # category -> mean residual std (nats)
    residual_std: np.ndarray  # [tokens]
    losses: np.ndarray  # [tokens, checkpoints]

    def to_json(self) -> dict[str, Any]:
        """The four fractions keyed by category at the top, then the curves and the rule."""
        return {**self.fractions, "tokens": int(self.categories.size), "steps": self.steps,
                "mean_loss": self.mean_loss, "fluctuation": self.fluctuation,
                "rule": {"fit": "least squares of each token's loss against the checkpoint steps",
                         "change": "slope * (last step - first step), nats", "threshold": THRESHOLD,
                         "H→L": "change < -threshold", "L→H": "change > threshold",
                         "L→L": "otherwise, final loss <= the mean final loss", "H→H": "otherwise"}}


def analyze(losses: np.ndarray, steps: list[int]) -> Dynamics:
    """``losses: [tokens, checkpoints]`` (finite) -> the categories and their curves."""
    categories = classify(losses, np.asarray(steps))
    _, residual = fitted_change(losses, np.asarray(steps))
    n = max(1, categories.size)
    fractions, mean_loss, fluctuation = {}, {}, {}
    for i, name in enumerate(CATEGORIES):
        members = categories == i
        fractions[name] = float(members.sum() / n)
        mean_loss[name] = [float(v) for v in losses[members].mean(axis=0)] if members.any() else []
        fluctuation[name] = float(residual[members].mean()) if members.any() else float("nan")
    return Dynamics(list(map(int, steps)), categories, fractions, mean_loss, fluctuation, residual, losses)


def loss_matrix(stores: list[str]) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
    """(losses [tokens, checkpoints], document lengths, each store's checkpoint step from its
    manifest's ``reference_model.step``, None where absent) from one score store per checkpoint,
    which must score the same tokens (``MismatchError`` otherwise)."""
    from rhocli.core.errors import MismatchError
    from rhocli.core.formats.scores import open_scores

    columns, steps, lengths, made_for = [], [], None, None
    for prefix in stores:
        store = open_scores(prefix, "--stores ")
        fp = (store.manifest.get("token_dataset") or {}).get("fingerprint")
        if lengths is None:
            lengths, made_for = store.lengths, fp
        elif fp != made_for or not np.array_equal(store.lengths, lengths):
            raise MismatchError(f"--stores {prefix}: scores other tokens than {stores[0]}")
        columns.append(np.asarray(store.values, dtype=np.float32))
        step = (store.manifest.get("reference_model") or {}).get("step")
        steps.append(int(step) if step is not None else None)
    return np.stack(columns, axis=1), np.asarray(lengths), steps


def write_dynamics(output: Path, dynamics: Dynamics, token_view: str, force: bool) -> dict[str, Path]:
    """``dynamics.json`` and the self-contained ``dynamics.html`` (charts + ``token_view``, the
    caller's HTML of the sample's tokens coloured by category) in ``output``."""
    import json

    from rhocli.core.formats.staging import check_outputs_free

    paths = {"json": output / "dynamics.json", "html": output / "dynamics.html"}
    check_outputs_free(list(paths.values()), force)
    output.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(dynamics.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["html"].write_text(_html(dynamics, token_view), encoding="utf-8")
    return paths


#: a colour per category (the token view and the charts)
COLOURS = {"H→H": "#d62728", "L→H": "#ff7f0e", "H→L": "#2ca02c", "L→L": "#1f77b4"}


def _html(d: Dynamics, token_view: str) -> str:
    import html

    from rhocli.core.plots import bar_chart, line_chart

    bars = bar_chart(d.fractions, "tokens per category", "fraction", colours=COLOURS)
    curves = line_chart({name: list(zip(d.steps, d.mean_loss[name])) for name in CATEGORIES if d.mean_loss[name]},
                        "mean loss per category (Fig. 2)", "step", "loss (nats)", colours=COLOURS)
    # Fig. 3: a few steady tokens' own trajectories; their wiggle is the fluctuation
    examples, colours, styles = {}, {}, {}
    for name in ("L→L", "H→H"):
        members = np.flatnonzero(d.categories == CATEGORIES.index(name))
        for rank, t in enumerate(members[np.argsort(-d.residual_std[members])][:3]):
            label = f"{name} token {t}"
            examples[label] = list(zip(d.steps, d.losses[t].tolist()))
            colours[label] = COLOURS[name]  # the category's colour; the three told apart by their dash
            styles[label] = "dashed" if rank == 1 else "solid"
    rows = "".join(f"<tr><td style='color:{COLOURS[n]}'>{n}</td><td>{d.fractions[n]:.1%}</td>"
                   f"<td>{d.fluctuation[n]:.3f}</td></tr>" for n in CATEGORIES)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>rho analyze dynamics</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}} td,th{{padding:2px 10px}}
.tok span{{white-space:pre-wrap}}</style></head><body>
<h1>Token loss dynamics</h1>
<p>{d.categories.size:,} tokens over {len(d.steps)} checkpoints (steps {html.escape(", ".join(map(str, d.steps)))}).
Rule: a least-squares line through each token's losses; a fitted change over the run below
−{THRESHOLD} nats is H→L, above +{THRESHOLD} is L→H; otherwise L→L if the final loss is at most the
mean final loss, else H→H. Rho-1 (TinyLlama on OpenWebMath): 51 % L→L, 26 % H→L, 11 % H→H, 12 % L→H.</p>
<table><tr><th>category</th><th>tokens</th><th>fluctuation (std around the fit, nats)</th></tr>{rows}</table>
{bars}
{curves}
{_examples_chart(examples, colours, styles)}
<h2>Tokens by category</h2>
<p>{"".join(f"<span style='color:{COLOURS[n]}'>■ {n}</span> " for n in CATEGORIES)}</p>
<div class="tok">{token_view}</div>
</body></html>
"""


def _examples_chart(examples: dict, colours: dict, styles: dict) -> str:
    from rhocli.core.plots import line_chart

    if not examples:
        return ""
    return line_chart(examples, "the most fluctuating L→L and H→H tokens (Fig. 3)", "step", "loss (nats)",
                      colours=colours, styles=styles)


def run_dynamics(output: Path, stores: list[str], force: bool = False, view_documents: int = 8) -> tuple[Dynamics, dict[str, Path]]:
    """Analyse the score stores (one per checkpoint, in training order: the steps come from their
    manifests' ``reference_model.step``) and write the report into ``output``."""
    losses, lengths, steps = loss_matrix(stores)
    if None in steps or len(set(steps)) != len(steps) or steps != sorted(steps):
        steps = list(range(len(stores)))  # not a run's checkpoints in order: checkpoints by position
    finite = np.isfinite(losses).all(axis=1)
    dynamics = analyze(losses[finite], steps)
    categories = np.full(losses.shape[0], -1, dtype=np.int8)
    categories[finite] = dynamics.categories
    return dynamics, write_dynamics(output, dynamics, _token_view(stores[0], lengths, categories, view_documents), force)


def _token_view(store: str, lengths: np.ndarray, categories: np.ndarray, documents: int) -> str:
    """The sample's first documents, each token coloured by its category (tooltip: the category)."""
    import html

    from rhocli.core.formats.scores import read_scores_manifest
    from rhocli.core.formats.tokens import TokenDataset
    from rhocli.core.tokenizers import display_pieces

    prefix = (read_scores_manifest(store).get("token_dataset") or {}).get("prefix")
    if not prefix or not Path(str(prefix) + ".bin").exists():
        return "<p>(the scored token dataset is not readable here: no token view)</p>"
    tokens = TokenDataset(prefix)
    tokenizer = ((tokens.manifest or {}).get("tokenizer") or {}).get("path")
    ends = np.concatenate([[0], np.cumsum(lengths)])
    blocks = []
    for d in range(min(documents, len(lengths))):
        pieces = display_pieces(tokenizer, tokens.document(d).tolist())
        spans = []
        for piece, c in zip(pieces, categories[ends[d]:ends[d + 1]]):
            name = CATEGORIES[c] if c >= 0 else "not scored"
            colour = COLOURS.get(name, "#999999")
            spans.append(f'<span style="color:{colour}" title="{name}">{html.escape(piece)}</span>')
        blocks.append(f'<p>{"".join(spans)}</p>')
    return "\n".join(blocks)


def dynamics_of_run(run_dir: Path, data: str, output: Path, sample_tokens: int, run_command, force: bool = False,
                    seq_len: int | None = None, on_scored=None) -> tuple[Dynamics, dict[str, Path]]:
    """Score a fixed sample of ``data`` with every checkpoint of the run (``analyze.sample``), then
    analyse the stores; ``force`` replaces the report and scores again."""
    from rhocli.analyze.sample import score_run_checkpoints
    from rhocli.core.formats.staging import check_outputs_free

    check_outputs_free([output / "dynamics.json", output / "dynamics.html"], force)
    scored = score_run_checkpoints(run_dir, data, output, sample_tokens, run_command, force, seq_len, on_scored)
    return run_dynamics(output, scored.stores, force=True)
