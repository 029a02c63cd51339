"""Self-contained HTML report of a token selection (Rho-1's Fig. 13): documents with each token
coloured by its score (excess loss) and the kept tokens marked, with summary plots as inline SVG.
No scripts, no external resources: the file opens anywhere."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from rhocli.core.errors import MissingInputError, OutputExistsError


def _colour(value: float, scale: float) -> str:
    """Diverging colour: high score red, low score blue, 0 white."""
    if not np.isfinite(value):
        return "#eeeeee"
    t = max(-1.0, min(1.0, value / scale))
    if t >= 0:
        return f"rgb(255,{int(255 * (1 - t * 0.75))},{int(255 * (1 - t * 0.75))})"
    return f"rgb({int(255 * (1 + t * 0.75))},{int(255 * (1 + t * 0.75))},255)"


def _histogram_svg(counts, edges, width=560, height=160) -> str:
    counts = np.asarray(counts, dtype=float)
    if counts.size == 0:
        return "<p>no finite scores</p>"
    top = counts.max() or 1.0
    bw = width / counts.size
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 20 - (c / top) * (height - 30):.1f}" width="{bw - 1:.1f}" '
        f'height="{(c / top) * (height - 30):.1f}" fill="#c0504d"><title>[{edges[i]:.2f}, {edges[i + 1]:.2f}): {int(c)}</title></rect>'
        for i, c in enumerate(counts)
    )
    axis = (f'<text x="0" y="{height - 4}" font-size="11">{edges[0]:.2f}</text>'
            f'<text x="{width - 40}" y="{height - 4}" font-size="11">{edges[-1]:.2f}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="score histogram">{bars}{axis}</svg>'


def write_selection_report(path: Path, ref_manifest: dict, lengths, values, mask, ref, cfg, hist, edges, force: bool) -> None:
    from rhocli.core.formats.staging import StagedOutput
    from rhocli.core.formats.tokens import TokenDataset
    from rhocli.core.tokenizers import display_pieces

    token_info = ref_manifest.get("token_dataset") or {}
    prefix = token_info.get("prefix")
    if not prefix or not Path(str(prefix) + ".bin").exists():
        raise MissingInputError(f"--report: the scored token dataset {prefix} is not readable; the report shows its tokens")
    tokens = TokenDataset(prefix)
    tokenizer_path = ((tokens.manifest or {}).get("tokenizer") or {}).get("path")
    ends = np.concatenate([[0], np.cumsum(lengths)])
    finite = values[np.isfinite(values)]
    scale = float(np.percentile(np.abs(finite), 95)) if finite.size else 1.0
    scale = scale or 1.0
    docs_html = []
    for d in range(min(cfg.report_documents, len(lengths))):
        a, b = int(ends[d]), int(ends[d + 1])
        ids = tokens.document(d).tolist()
        pieces = display_pieces(tokenizer_path, ids)
        spans = []
        for j, piece in enumerate(pieces):
            v, kept = float(values[a + j]), bool(mask[a + j])
            text = html.escape(piece).replace("\n", "↵<br>")
            cls = "k" if kept else "d"
            spans.append(f'<span class="{cls}" style="background:{_colour(v, scale)}" '
                         f'title="score {v:.3f}, reference loss {float(ref[a + j]):.3f}, {"kept" if kept else "dropped"}">{text}</span>')
        kept_frac = float(mask[a:b].mean()) if b > a else 0.0
        docs_html.append(f'<section class="doc"><h3>document {d} — {b - a} tokens, {kept_frac:.0%} kept</h3>'
                         f'<p class="tokens">{"".join(spans)}</p></section>')
    title = f"rho select: {cfg.score} top {cfg.ratio:.0%} per {cfg.scope}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
.tokens {{ font-family: ui-monospace, monospace; font-size: 14px; line-height: 1.9; white-space: pre-wrap; }}
.k {{ font-weight: 700; border-bottom: 2px solid #222; }}
.d {{ color: #777; }}
.legend span {{ padding: 0 .4em; }}
table {{ border-collapse: collapse; }} td {{ padding: .2em .8em; border-bottom: 1px solid #ddd; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table>
<tr><td>scores</td><td>{html.escape(str(cfg.scores))}{(" − base " + html.escape(str(cfg.base_scores))) if cfg.base_scores else ""}</td></tr>
<tr><td>token dataset</td><td>{html.escape(str(prefix))}</td></tr>
<tr><td>documents / tokens</td><td>{len(lengths):,} / {int(mask.size):,}</td></tr>
<tr><td>kept</td><td>{int(mask.sum()):,} ({mask.mean() if mask.size else 0:.1%})</td></tr>
<tr><td>mean score (all / kept / dropped)</td><td>{finite.mean() if finite.size else float('nan'):.3f} /
 {np.nanmean(values[mask]) if mask.any() else float('nan'):.3f} / {np.nanmean(values[~mask]) if (~mask).any() else float('nan'):.3f}</td></tr>
</table>
<h2>Score distribution</h2>
{_histogram_svg(hist, edges)}
<h2>Documents</h2>
<p class="legend">Colour: score (<span style="background:{_colour(-scale, scale)}">low</span>
<span style="background:#fff">0</span> <span style="background:{_colour(scale, scale)}">high</span>);
<span class="k">bold underlined</span> = kept, <span class="d">grey</span> = dropped. Hover a token for its values.</p>
{"".join(docs_html)}
</body></html>
"""
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: report already exists; pass --force to replace it")
    with StagedOutput([path], force=force) as stage, stage.staged_writes():
        stage.path(path).write_text(page, encoding="utf-8")
        stage.commit()
