"""Rho-1's claim on real text, on a CPU: CLM vs SLM (ratio sweep) on GSM8K problems mixed with
WikiText-2, held-out loss on GSM8K problems neither model saw. docs/experiment.md has the results.

    python experiments/gsm8k_wikitext.py --shared ../shared --output experiment-gsm8k
    python experiments/gsm8k_wikitext.py --shared ../shared --output exp-big --steps 2000 --ratios 0.6,1.0 --tp 2

Every stage is the real rho command line, run in this process through rho's one public entry
(``rhocli.app.invoke``); results are read back with rho's format readers (``rhocli.core.formats``):

1. data: GSM8K train shuffled (seed 1234) → reference set (first --reference-docs problems),
   held-out set (last --heldout-docs), and the corpus: the next --math-docs problems mixed with every
   WikiText-2 valid+test paragraph, shuffled;
2. rho tokenize (Llama-2 SentencePiece) → rho train the reference model on the reference set →
   rho score the corpus with it;
3. for each ratio: rho train on the corpus for the same steps (1.0 = plain CLM; otherwise
   --scores --select-ratio R --select-scope microbatch), validating on the held-out set; and the
   document-level baseline: rho select --score reference --scope filter (whole documents with the
   lowest mean reference loss, --filter-ratio of the tokens) → rho train --mask, and the same
   documents tokenized as a dataset of their own → rho train (a filtering pipeline's output), and
   SLM on that filtered dataset (--filter-slm-ratios: filter documents, then select tokens);
4. kept tokens by source: rho score a corpus sample with the ratio-0.6 run's mid checkpoint, then
   rho select (excess loss, global scope) and count the mask by source;
5. results.json, report.md and SVG curves in --output.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from rhocli.core.recipe import add_recipe_arguments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(ap, shared=ROOT.parent / "shared", output=Path("experiment-gsm8k"))
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "experiment-gsm8k.yaml")
    ap.add_argument("--ratios", default="0.4,0.5,0.6,0.7,0.8,1.0")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps for the corpus runs")
    ap.add_argument("--reference-steps", type=int, default=300)
    ap.add_argument("--reference-docs", type=int, default=2500)
    ap.add_argument("--heldout-docs", type=int, default=400)
    ap.add_argument("--math-docs", type=int, default=2500)
    ap.add_argument("--sample-docs", type=int, default=150, help="per source, for the kept-by-source count")
    ap.add_argument("--filter-ratio", type=float, default=0.5,
                    help="also train on a document-level perplexity filter of the corpus keeping this fraction of "
                         "its tokens (rho select --score reference --scope filter, rho train --mask); 0: skip")
    ap.add_argument("--filter-slm-ratios", default="0.6",
                    help="SLM ratios to train on the packed filtered corpus (filter, then select tokens); empty: skip")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import yaml

    from rhocli.app import invoke as run_rho
    from rhocli.core.corpora import gsm8k_text, read_jsonl, write_jsonl
    from rhocli.core.corpora import wikitext_paragraphs as paragraphs
    from rhocli.core.formats.masks import read_masks
    from rhocli.core.formats.metrics import read_metrics, steps_to_reach
    from rhocli.core.megatron_io import quiet_megatron
    from rhocli.core.plots import bar_chart, line_chart
    from rhocli.core.recipe import start_recipe

    quiet_megatron()
    recipe = start_recipe(args, subdirs=("data", "tokens", "runs", "scores", "select"),
                          settings=("reference_docs", "heldout_docs", "math_docs", "reference_steps"),
                          invoke=run_rho, log=lambda line: print(line, flush=True))
    inputs, out = recipe.inputs, recipe.out
    ratios = [float(r) for r in args.ratios.split(",")]
    layout = (["--tp", str(args.tp)] if args.tp > 1 else []) + (["--pp", str(args.pp)] if args.pp > 1 else [])
    config = yaml.safe_load(args.config.read_text())
    steps = args.steps or config["train"]["steps"]
    stage, timings = recipe.runner.stage, recipe.runner.timings
    t_all = time.perf_counter()

    # ---- 1. data
    rng = random.Random(1234)
    problems = read_jsonl(inputs.gsm8k)
    rng.shuffle(problems)
    reference = problems[: args.reference_docs]
    heldout = problems[-args.heldout_docs:]
    math = problems[args.reference_docs: args.reference_docs + args.math_docs]
    assert len(reference) + len(math) + len(heldout) <= len(problems), "GSM8K is too small for these sizes"
    corpus = [{"text": gsm8k_text(r), "source": "gsm8k"} for r in math]
    corpus += [{"text": t, "source": "wikitext"} for p in inputs.wikitext for t in paragraphs(p)]
    rng.shuffle(corpus)
    write_jsonl(out / "data" / "reference.jsonl", [{"text": gsm8k_text(r)} for r in reference])
    write_jsonl(out / "data" / "heldout.jsonl", [{"text": gsm8k_text(r)} for r in heldout])
    write_jsonl(out / "data" / "corpus.jsonl", corpus)
    sample = ([r for r in corpus if r["source"] == "gsm8k"][: args.sample_docs]
              + [r for r in corpus if r["source"] == "wikitext"][: args.sample_docs])
    write_jsonl(out / "data" / "sample.jsonl", sample)

    stage("tokenize", [["tokenize", out / "data" / f"{n}.jsonl", "--tokenizer", inputs.tokenizer, "--output", out / "tokens" / n, "-q"]
                       for n in ("reference", "heldout", "corpus", "sample")])

    def train(run, data, n_steps, extra=()):
        return ["train", args.config, "--data", out / "tokens" / data, "--eval-data", out / "tokens" / "heldout",
                "--save", out / "runs" / run, "--steps", n_steps, "--save-interval", max(1, n_steps // 2), *layout, *extra, "-q"]

    stage("train reference", [train("reference", "reference", args.reference_steps)])
    stage("score corpus", [["score", "--model", out / "runs" / "reference", "--data", out / "tokens" / "corpus",
                            "--output", out / "scores" / "corpus.reference", *layout, "-q"]])
    for r in ratios:
        name = "clm" if r == 1.0 else f"slm{r:g}"
        extra = [] if r == 1.0 else ["--scores", out / "scores" / "corpus.reference", "--select-ratio", r, "--select-scope", "microbatch"]
        stage(f"train {name}", [train(name, "corpus", steps, extra)])
    if args.filter_ratio > 0:
        # the document-level baseline: whole corpus documents with the lowest mean reference loss, up to
        # --filter-ratio of the tokens, trained on with the same data order, steps and normalisation
        name = f"filter{args.filter_ratio:g}"
        stage(f"train {name}", [
            ["select", "--scores", out / "scores" / "corpus.reference", "--score", "reference", "--scope", "filter",
             "--ratio", args.filter_ratio, "--output", out / "select" / "corpus.filter"],
            train(name, "corpus", steps, ["--mask", out / "select" / "corpus.filter"]),
        ])
        # the same documents as a dataset of their own (what a filtering pipeline hands to training):
        # every step then trains on 1,024 kept tokens, where the masked run above trains on ~half
        filter_mask = read_masks(out / "select" / "corpus.filter")
        write_jsonl(out / "data" / "filtered.jsonl",
                    [{"text": r["text"]} for i, r in enumerate(corpus) if filter_mask[i].any()])
        stage(f"train {name} packed", [
            ["tokenize", out / "data" / "filtered.jsonl", "--tokenizer", inputs.tokenizer, "--output", out / "tokens" / "filtered", "-q"],
            train(f"packed{args.filter_ratio:g}", "filtered", steps),
        ])
        # filter, then select tokens: SLM on the filtered corpus, scored by the same reference model
        filter_slm = [float(r) for r in args.filter_slm_ratios.split(",") if r.strip()]
        if filter_slm:
            stage("score filtered", [["score", "--model", out / "runs" / "reference", "--data", out / "tokens" / "filtered",
                                      "--output", out / "scores" / "filtered.reference", *layout, "-q"]])
            for r in filter_slm:
                stage(f"train packed + slm{r:g}", [train(
                    f"packed{args.filter_ratio:g}slm{r:g}", "filtered", steps,
                    ["--scores", out / "scores" / "filtered.reference", "--select-ratio", r, "--select-scope", "microbatch"])])

    # ---- 4. kept tokens by source (static proxy of the online rule at mid-training)
    probe = "slm0.6" if 0.6 in ratios else next((f"slm{r:g}" for r in ratios if r < 1.0), None)
    kept = {}
    if probe:
        stage("select sample", [
            ["score", "--model", out / "runs" / "reference", "--data", out / "tokens" / "sample", "--output", out / "scores" / "sample.reference", *layout, "-q"],
            ["score", "--model", out / "runs" / probe / f"step_{steps // 2:06d}", "--data", out / "tokens" / "sample",
             "--output", out / "scores" / "sample.probe", *layout, "-q"],
            ["select", "--scores", out / "scores" / "sample.reference", "--base-scores", out / "scores" / "sample.probe",
             "--ratio", 0.6, "--scope", "global", "--output", out / "select" / "sample.mask", "--report", out / "select" / "tokens.html"],
        ])
        mask = read_masks(out / "select" / "sample.mask")
        for source in ("gsm8k", "wikitext"):
            idx = [i for i, r in enumerate(sample) if r["source"] == source]
            values = np.concatenate([mask[i] for i in idx]).astype(np.uint8)
            kept[source] = {"tokens": int(values.size), "kept": float(values.mean())}

    # ---- 5. results
    curves = {run.name: read_metrics(run) for run in sorted((out / "runs").iterdir()) if (run / "metrics.jsonl").is_file()}
    clm_final = curves["clm"]["valid"][-1][1] if "clm" in curves else None
    rows = []
    for name, c in curves.items():
        if name == "reference":
            continue
        final = c["valid"][-1][1]
        reach = steps_to_reach(c["valid"], clm_final) if clm_final is not None else None
        rows.append({"run": name, "final_heldout": final, "best_heldout": min(v for _, v in c["valid"]),
                     "steps_to_clm_final": reach, "speedup": (steps / reach) if reach else None})
    results = {"steps": steps, "ratios": ratios, "rows": rows, "kept_by_source": kept, "curves": curves,
               "reference_heldout": curves["reference"]["valid"][-1][1], "seconds": timings,
               "total_seconds": time.perf_counter() - t_all,
               "sizes": {"reference_docs": len(reference), "heldout_docs": len(heldout), "math_docs": len(math),
                         "wikitext_paragraphs": sum(1 for r in corpus if r["source"] == "wikitext")}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    def label(n: str) -> str:
        if n == "clm":
            return "CLM"
        if n.startswith("slm"):
            return f"SLM {n[3:]}"
        if n.startswith("filter"):
            return f"doc filter {n[6:]}"
        base, _, slm = n[6:].partition("slm")
        return f"doc filter {base} packed" + (f" + SLM {slm}" if slm else "")

    series = {label(n): [(s, v) for s, v in c["valid"] if s > 0] for n, c in curves.items() if n != "reference"}
    (out / "heldout_loss.svg").write_text(line_chart(series, "Held-out GSM8K loss: CLM, SLM ratios, document filters", "training step",
                                                     "loss (nats/token)"))
    if kept:
        (out / "kept_by_source.svg").write_text(bar_chart({k: v["kept"] for k, v in kept.items()},
                                                          "Tokens kept at ratio 0.6, by source", "kept fraction", y_max=1.0))
    lines = ["| run | final held-out loss | best | steps to CLM's final | speed-up |", "|---|---|---|---|---|"]
    for r in rows:
        reach = f"{r['steps_to_clm_final']:.0f}" if r["steps_to_clm_final"] else "not reached"
        speed = f"{r['speedup']:.2f}×" if r["speedup"] else "-"
        lines.append(f"| {r['run']} | {r['final_heldout']:.4f} | {r['best_heldout']:.4f} | {reach} | {speed} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"kept by source: {kept}")
    print(f"total {results['total_seconds']:.0f} s; everything is under {out}")
    return 0


if __name__ == "__main__":
    from rhocli.app import run_recipe

    sys.exit(run_recipe(main))
