"""Rho-1's setting in miniature: continual pretraining. A base model pretrained on general text
(WikiText-2); a reference model fine-tuned from that base on clean GSM8K problems; then CLM, SLM and
the random-selection control continued from the same base on a noisy corpus (other GSM8K problems,
WikiText-2 and noise), over several seeds. docs/experiment.md has the results.

    python experiments/continual.py --shared ../shared --output exp-continual
    python experiments/continual.py --shared ../shared --output exp-c2 --seeds 1,2,3,4,5 --ratio 0.5 --steps 400

Every stage is the real rho command line, run in this process through rho's one public entry
(``rhocli.app.invoke``); results are read back with rho's format readers:

1. data (GSM8K train shuffled, seed 1234; WikiText-2 valid+test paragraphs shuffled): general text =
   the first --general-share of the WikiText paragraphs; reference set = the first --reference-docs
   problems; held-out = the last --heldout-docs problems; the noisy corpus = the next --math-docs
   problems, the remaining WikiText paragraphs, and --noise-docs noise documents (half GSM8K problems
   whose numbers were replaced by random ones: wrong arithmetic; half word salad drawn from WikiText's
   words), shuffled;
2. rho tokenize (Llama-2 SentencePiece); rho train the base on the general text (--base-steps);
   rho train --init BASE the reference on the reference set (--reference-steps); rho score the
   noisy corpus with the reference;
3. for each seed: from --init BASE, --steps on the noisy corpus: CLM; SLM (--select-ratio, excess,
   microbatch scope) with the per-document score store; SLM with the reference run online on each
   step's samples (--reference: the excess on one context); the random control (--select-by random at
   the same ratio); each validating on the held-out problems every --eval-interval steps;
4. results-ratioR-Nsteps.json (curves, per-seed rows), report-....md (mean ± spread over seeds) and
   heldout_loss-....svg. ``--reuse`` with another --ratio / --steps / --seeds runs only the new arms.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: slm: the reference losses from the per-document score store (each document scored alone);
#: slm_online: the reference run online on the very samples each step trains on (rho train --reference)
ARMS = ("clm", "slm", "slm_online", "random")


def corrupt_numbers(text: str, rng: random.Random) -> str:
    """Every number replaced by a random one of the same length: fluent text, wrong arithmetic."""
    return re.sub(r"\d+", lambda m: str(rng.randint(10 ** (len(m.group()) - 1) if len(m.group()) > 1 else 0,
                                                    10 ** len(m.group()) - 1)), text)


def word_salad(words: list[str], n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def main() -> int:
    from rhocli.core.recipe import add_recipe_arguments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(ap, shared=ROOT.parent / "shared", output=Path("exp-continual"))
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "experiment-gsm8k.yaml")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--steps", type=int, default=200, help="continual-pretraining steps of each arm")
    ap.add_argument("--base-steps", type=int, default=400)
    ap.add_argument("--reference-steps", type=int, default=150)
    ap.add_argument("--eval-interval", type=int, default=25)
    ap.add_argument("--reference-docs", type=int, default=2000)
    ap.add_argument("--heldout-docs", type=int, default=400)
    ap.add_argument("--math-docs", type=int, default=2000)
    ap.add_argument("--noise-docs", type=int, default=1500)
    ap.add_argument("--general-share", type=float, default=0.6, help="share of WikiText paragraphs for the base model")
    ap.add_argument("--trace-steps", type=int, default=20, help="SLM arms: steps whose selection is traced")
    ap.add_argument("--arms", default=",".join(ARMS), help="which arms to train (comma-separated)")
    args = ap.parse_args()

    from rhocli.app import invoke as run_rho
    from rhocli.core.corpora import gsm8k_text, read_jsonl, wikitext_paragraphs, write_jsonl
    from rhocli.core.formats.metrics import read_metrics, steps_to_reach
    from rhocli.core.megatron_io import quiet_megatron
    from rhocli.core.plots import line_chart
    from rhocli.core.recipe import start_recipe

    quiet_megatron()
    recipe = start_recipe(args, subdirs=("data", "tokens", "runs", "scores"),
                          settings=("reference_docs", "heldout_docs", "math_docs", "noise_docs", "general_share",
                                    "base_steps", "reference_steps"),
                          invoke=run_rho, log=lambda line: print(line, flush=True))
    inputs, out = recipe.inputs, recipe.out
    seeds = [int(s) for s in args.seeds.split(",")]
    stage, timings = recipe.runner.stage, recipe.runner.timings
    t_all = time.perf_counter()

    # ---- 1. data
    rng = random.Random(1234)
    problems = read_jsonl(inputs.gsm8k)
    rng.shuffle(problems)
    paragraphs = [t for p in inputs.wikitext for t in wikitext_paragraphs(p)]
    rng.shuffle(paragraphs)
    n_general = int(len(paragraphs) * args.general_share)
    general, wiki_rest = paragraphs[:n_general], paragraphs[n_general:]
    reference = problems[: args.reference_docs]
    heldout = problems[-args.heldout_docs:]
    math = problems[args.reference_docs: args.reference_docs + args.math_docs]
    spare = problems[args.reference_docs + args.math_docs: -args.heldout_docs]
    assert len(spare) >= args.noise_docs // 2, "GSM8K is too small for these sizes"
    words = [w for t in general for w in t.split()]
    noise = [corrupt_numbers(gsm8k_text(r), rng) for r in spare[: args.noise_docs // 2]]
    noise += [word_salad(words, rng.randint(40, 160), rng) for _ in range(args.noise_docs - len(noise))]
    corpus = ([{"text": gsm8k_text(r), "source": "gsm8k"} for r in math]
              + [{"text": t, "source": "wikitext"} for t in wiki_rest]
              + [{"text": t, "source": "noise"} for t in noise])
    rng.shuffle(corpus)
    write_jsonl(out / "data" / "general.jsonl", [{"text": t} for t in general])
    write_jsonl(out / "data" / "reference.jsonl", [{"text": gsm8k_text(r)} for r in reference])
    write_jsonl(out / "data" / "heldout.jsonl", [{"text": gsm8k_text(r)} for r in heldout])
    write_jsonl(out / "data" / "corpus.jsonl", corpus)
    stage("tokenize", [["tokenize", out / "data" / f"{n}.jsonl", "--tokenizer", inputs.tokenizer, "--output", out / "tokens" / n, "-q"]
                       for n in ("general", "reference", "heldout", "corpus")])

    def train(run, data, steps, extra=()):
        return ["train", args.config, "--data", out / "tokens" / data, "--eval-data", out / "tokens" / "heldout",
                "--save", out / "runs" / run, "--steps", steps, "--save-interval", steps,
                "--eval-interval", args.eval_interval, *extra, "-q"]

    base = out / "runs" / "base"
    stage("train base (general text)", [train("base", "general", args.base_steps)])
    stage("train reference (from base, clean problems)", [train("reference", "reference", args.reference_steps, ["--init", base])])
    stage("score corpus", [["score", "--model", out / "runs" / "reference", "--data", out / "tokens" / "corpus",
                            "--output", out / "scores" / "corpus.reference", "-q"]])
    # the SLM arms trace their first steps' selection (rho analyze context reads it)
    trace = ["--trace-selection", args.trace_steps] if args.trace_steps else []
    selection = {"clm": [], "slm": ["--scores", out / "scores" / "corpus.reference", "--select-ratio", args.ratio,
                                    "--select-scope", "microbatch", *trace],
                 "slm_online": ["--reference", out / "runs" / "reference", "--select-ratio", args.ratio,
                                "--select-scope", "microbatch", *trace],
                 "random": ["--select-by", "random", "--select-ratio", args.ratio, "--select-scope", "microbatch"]}
    def run_name(arm, seed):  # the ratio and the steps in the name: --reuse never mistakes one run for another
        return f"{arm}{'' if arm == 'clm' else f'{args.ratio:g}'}-{args.steps}steps-s{seed}"

    arms = [a for a in ARMS if a in args.arms.split(",")]
    for seed in seeds:
        for arm in arms:
            stage(f"train {arm} seed {seed}", [train(run_name(arm, seed), "corpus", args.steps,
                                                     ["--init", base, "--seed", seed, *selection[arm]])])

    # ---- 4. results
    curves = {arm: {seed: read_metrics(out / "runs" / run_name(arm, seed))["valid"] for seed in seeds} for arm in arms}
    base_loss = read_metrics(base)["valid"][-1][1]
    reference_loss = read_metrics(out / "runs" / "reference")["valid"][-1][1]
    per_seed = []
    for seed in seeds:
        clm_final = curves["clm"][seed][-1][1]
        for arm in arms:
            valid = curves[arm][seed]
            reach = steps_to_reach(valid, clm_final)
            per_seed.append({"arm": arm, "seed": seed, "final_heldout": valid[-1][1], "steps_to_clm_final": reach,
                             "speedup": (args.steps / reach) if reach else None})

    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}

    summary = {arm: {"final_heldout": spread([r["final_heldout"] for r in per_seed if r["arm"] == arm]),
                     "steps_to_clm_final": spread([r["steps_to_clm_final"] for r in per_seed if r["arm"] == arm]),
                     "reached": sum(1 for r in per_seed if r["arm"] == arm and r["steps_to_clm_final"] is not None),
                     "speedup": spread([r["speedup"] for r in per_seed if r["arm"] == arm])} for arm in arms}
    results = {"settings": vars(args) | {"shared": str(args.shared), "output": str(args.output), "config": str(args.config)},
               "seeds": seeds, "base_heldout": base_loss, "reference_heldout": reference_loss, "per_seed": per_seed,
               "summary": summary, "curves": curves, "seconds": timings, "total_seconds": time.perf_counter() - t_all,
               "sizes": {"general_paragraphs": len(general), "reference_docs": len(reference), "heldout_docs": len(heldout),
                         "corpus": {s: sum(1 for r in corpus if r["source"] == s) for s in ("gsm8k", "wikitext", "noise")}}}
    tag = f"ratio{args.ratio:g}-{args.steps}steps"
    (out / f"results-{tag}.json").write_text(json.dumps(results, indent=1, default=str))
    colours = {"clm": "#1f77b4", "slm": "#d62728", "slm_online": "#2ca02c", "random": "#7f7f7f"}
    series, styles, series_colours = {}, {}, {}
    for arm in arms:
        for seed in seeds:
            name = f"{arm.upper().replace('_', ' ') if arm != 'random' else 'random'} seed {seed}"
            series[name] = [(s, v) for s, v in curves[arm][seed] if s > 0]
            series_colours[name] = colours[arm]
            styles[name] = "dashed" if seed != seeds[0] else "solid"
    (out / f"heldout_loss-{tag}.svg").write_text(line_chart(series, "Continual pretraining from the base: held-out GSM8K loss",
                                                     "training step", "loss (nats/token)", styles=styles, colours=series_colours))

    def fmt(s, f="{:.4f}"):
        if s is None:
            return "-"
        return f"{f.format(s['mean'])} ± {f.format(s['std'])} [{f.format(s['min'])}, {f.format(s['max'])}]"

    lines = [f"base {base_loss:.4f}, reference {reference_loss:.4f} (held-out loss); seeds {seeds}; ratio {args.ratio}",
             "", "| arm | final held-out loss (mean ± std [min, max]) | steps to CLM's final | seeds that reach it | speed-up |",
             "|---|---|---|---|---|"]
    for arm in arms:
        s = summary[arm]
        lines.append(f"| {arm} | {fmt(s['final_heldout'])} | {fmt(s['steps_to_clm_final'], '{:.0f}')} | "
                     f"{s['reached']}/{len(seeds)} | {fmt(s['speedup'], '{:.2f}')} |")
    (out / f"report-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"total {results['total_seconds']:.0f} s; everything is under {out}")
    return 0


if __name__ == "__main__":
    from rhocli.app import run_recipe

    sys.exit(run_recipe(main))
