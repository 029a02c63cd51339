"""``rho demo``'s HTML report: the results table, held-out loss curves of CLM vs SLM, the kept
fraction per token kind, and a token view of corpus documents (kept tokens highlighted, each token's
kind underlined). Self-contained: inline SVG and CSS, no scripts."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


from rhocli.demo.corpus import KINDS
from rhocli.core.plots import bar_chart, line_chart

KIND_COLOURS = dict(zip(KINDS, ("#888888", "#2ca02c", "#1f77b4", "#d62728", "#ff7f0e", "#9467bd", "#8c564b")))


def curves_svg(results: dict[str, Any]) -> str:
    curves = results["curves"]
    ref_final = results["heldout"]["reference"]["all"]
    steps = [s for s, _ in curves["clm"]["valid"]]
    series = {
        "CLM (all tokens)": [(s, v) for s, v in curves["clm"]["valid"] if s > 0],
        f"SLM ({results['config']['ratio']:.0%} of tokens)": [(s, v) for s, v in curves["slm"]["valid"] if s > 0],
        "reference model": [(min(steps[1:] or steps), ref_final), (max(steps), ref_final)],
    }
    return line_chart(series, "Held-out loss on clean problems", "training step", "loss (nats/token)",
                      styles={"reference model": "dashed"})


def kept_svg(results: dict[str, Any]) -> str:
    kept = {k: v["kept"] for k, v in results["kept_by_kind"].items() if v["tokens"]}
    return bar_chart(kept, "Tokens kept by SLM's rule, by kind", "kept fraction", y_max=1.0, colours=KIND_COLOURS)


def results_table_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(step, CLM held-out loss, SLM held-out loss) at each evaluation."""
    slm = dict(results["curves"]["slm"]["valid"])
    return [(str(s), f"{v:.4f}", f"{slm[s]:.4f}" if s in slm else "-") for s, v in results["curves"]["clm"]["valid"]]


def _token_view(run, documents: int = 12) -> str:
    """The first sample documents, token by token: kept tokens on green, dropped ones grey."""
    import sentencepiece as spm

    from rhocli.core.formats.masks import read_masks
    from rhocli.core.formats.scores import open_scores
    from rhocli.core.formats.tokens import TokenDataset

    sp = spm.SentencePieceProcessor(model_file=run.p("data", "tokenizer.model"))
    tokens = TokenDataset(run.p("tokens", "sample"))
    kinds = run._kinds("sample")
    mask = read_masks(run.p("select", "sample.mask"))
    ref = [v.astype("float64") for v in open_scores(run.p("scores", "sample.reference")).documents()]
    base = [v.astype("float64") for v in open_scores(run.p("scores", "sample.slm")).documents()]
    blocks = []
    for d in range(min(documents, tokens.num_documents)):
        spans = []
        for t, k, m, r, b in zip(tokens.document(d), kinds[d], mask[d], ref[d], base[d]):
            piece = sp.id_to_piece(int(t))
            text = "⏎" if piece == "</s>" else piece.replace("\u2581", " ")
            cls = "kept" if m > 0 else "dropped"
            tip = f"{KINDS[k]}; loss {b:.2f} - reference {r:.2f} = excess {b - r:+.2f}; {'kept' if m > 0 else 'dropped'}"
            spans.append(f'<span class="{cls}" style="border-bottom-color:{KIND_COLOURS[KINDS[k]]}" '
                         f'title="{html.escape(tip)}">{html.escape(text)}</span>')
        blocks.append(f'<div class="doc">{"".join(spans)}</div>')
    return "\n".join(blocks)


def write_demo_report(path: Path, results: dict[str, Any], run) -> None:
    cfg = results["config"]
    held = results["heldout"]
    reach = results["slm_steps_to_clm_final"]
    clm_steps = results["curves"]["clm"]["valid"][-1][0]
    reach_text = (f"SLM reached CLM's final held-out loss at step {reach:.0f} of {clm_steps} "
                  f"({clm_steps / reach:.2f}× fewer steps)." if reach else
                  "SLM did not reach CLM's final held-out loss within the budget.")
    rows = "".join(f"<tr><td>{s}</td><td>{c}</td><td>{m}</td></tr>" for s, c, m in results_table_rows(results))
    kind_cols = [k for k in KINDS if k in held["clm"]]
    held_rows = "".join(
        f"<tr><td>{name}</td><td>{held[run_]['all']:.4f}</td>" + "".join(f"<td>{held[run_][k]:.4f}</td>" for k in kind_cols) + "</tr>"
        for run_, name in (("reference", "reference (trained on clean text)"), ("clm", "CLM"), ("slm", "SLM")))
    kept_rows = "".join(f"<tr><td><span class='swatch' style='background:{KIND_COLOURS[k]}'></span>{k}</td>"
                        f"<td>{v['tokens']:,}</td><td>{v['kept']:.1%}</td></tr>"
                        for k, v in results["kept_by_kind"].items() if v["tokens"])
    acc_rows = "".join(f"<tr><td>{name}</td><td>{results['accuracy'][run_]['acc']:.1f} %</td>"
                       f"<td>{results['accuracy'][run_]['no_answer']}</td></tr>" for run_, name in (("clm", "CLM"), ("slm", "SLM")))
    timing_rows = "".join(f"<tr><td>{k}</td><td>{v:.1f} s</td></tr>" for k, v in results["seconds"].items())
    legend = " ".join(f"<span class='swatch' style='background:{c}'></span>{k}" for k, c in KIND_COLOURS.items())
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rho demo: CLM vs SLM</title>
<style>
body {{ font-family: sans-serif; max-width: 980px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.doc {{ font-family: monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ddd; padding: 8px;
        margin: 8px 0; }}
.doc span {{ border-bottom: 3px solid; }}
.kept {{ background: #c8f0c8; }}
.dropped {{ color: #999; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 10px; vertical-align: middle; }}
</style></head><body>
<h1>rho demo: selective language modeling in miniature</h1>
<p>A tiny Llama ({cfg['tp']}×TP, {cfg['pp']}×PP) trained twice on the same noisy corpus for the same steps:
<b>CLM</b> on every token, <b>SLM</b> on the {cfg['ratio']:.0%} of tokens with the highest excess loss
(training loss − the loss of a reference model trained on clean problems). Both are evaluated on
held-out clean problems that neither saw.</p>
<p><b>{html.escape(reach_text)}</b></p>
<h2>Held-out loss during training</h2>
{curves_svg(results)}
<table><tr><th>step</th><th>CLM</th><th>SLM</th></tr>{rows}</table>
<h2>Held-out loss of the final models, by token kind</h2>
<p><i>result</i> tokens are the results of the calculations in the worked solutions: the tokens a model must
compute rather than copy.</p>
<table><tr><th>model</th><th>all tokens</th>{''.join(f'<th>{k}</th>' for k in kind_cols)}</tr>{held_rows}</table>
<h2>Held-out accuracy</h2>
<p>Each final model answers {results['accuracy']['clm']['problems']} held-out problems, greedily
(<code>rho eval --task gsm8k</code>; their outputs are in <code>evals/</code>): the fraction whose final
answer is right. Rho-1's Figure 1 in miniature.</p>
<table><tr><th>model</th><th>answers right</th><th>no answer</th></tr>{acc_rows}</table>
<h2>Which tokens SLM keeps</h2>
<p>Selection by excess loss of the SLM model at step {clm_steps // 2} against the reference model: the top
{cfg['ratio']:.0%} of the tokens of a corpus sample (<code>rho select --scope global</code>; its own report:
<a href="select/tokens.html">select/tokens.html</a>).</p>
{kept_svg(results)}
<table><tr><th>kind</th><th>tokens</th><th>kept</th></tr>{kept_rows}</table>
<h2>Tokens</h2>
<p>Kept tokens on green, dropped tokens grey; the underline is the token's kind: {legend}. Hover a token
for its losses.</p>
{_token_view(run)}
<h2>Time per stage</h2>
<table>{timing_rows}</table>
</body></html>
"""
    path.write_text(doc, encoding="utf-8")
