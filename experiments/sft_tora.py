"""An interpreter model in miniature (docs/sft.md): a base pretrained on general text, fine-tuned on
tool-integrated solutions built from GSM8K train (question -> reasoning -> python program -> its
printed result -> boxed answer), trained on the response only (the prompt and the interpreter's
output blocks masked), examples packed and kept apart; then ``rho eval --prompt tora`` on held-out
GSM8K problems, the model writing programs that rho's sandbox runs.

    python experiments/sft_tora.py --shared ../shared --output exp-sft

Every stage is the real rho command line, run in this process through ``rhocli.app.invoke``:

1. data: GSM8K train shuffled (seed 1234): the first --sft-docs problems whose calculator annotations
   make a program (``rhocli.core.corpora.gsm8k_tora``) are the SFT set; the last --heldout-docs
   problems are held out for ``rho eval``; the base pretrains on the WikiText-2 valid+test paragraphs;
2. rho tokenize (Llama-2 SentencePiece): the general text; the SFT set with --prompt-key question
   --response-key solution --chat-template tora --mask-spans output --seq-length (PREFIX.mask);
3. rho train the base (--base-steps, or --init MODEL to start from your own); rho train the SFT run
   --init BASE --mask --pack whole --separate-documents --epochs, validating on the held-out 5 % of the SFT
   examples' response tokens;
4. rho eval of the base and of the SFT model (--prompt tora, the interpreter models' format), and
   results.json / report.md: held-out response loss, accuracy, how many completions ran a program.
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
    add_recipe_arguments(ap, shared=ROOT.parent / "shared", output=Path("exp-sft"))
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "experiment-gsm8k.yaml")
    ap.add_argument("--init", default=None, help="start the SFT from this model instead of training a base")
    ap.add_argument("--base-steps", type=int, default=400)
    ap.add_argument("--sft-docs", type=int, default=1000)
    ap.add_argument("--heldout-docs", type=int, default=100)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-new-tokens", type=int, default=320)
    args = ap.parse_args()

    from rhocli.app import invoke as run_rho
    from rhocli.core.corpora import gsm8k_tora, read_jsonl, wikitext_paragraphs, write_jsonl
    from rhocli.core.formats.eval_outputs import METRICS_NAME, OUTPUTS_NAME, read_json, read_outputs
    from rhocli.core.formats.metrics import read_metrics
    from rhocli.core.megatron_io import quiet_megatron
    from rhocli.core.recipe import start_recipe

    quiet_megatron()
    recipe = start_recipe(args, subdirs=("data", "tokens", "runs", "eval"),
                          settings=("init", "base_steps", "sft_docs", "heldout_docs", "seq_length"),
                          invoke=run_rho, log=lambda line: print(line, flush=True))
    inputs, out = recipe.inputs, recipe.out
    stage = recipe.runner.stage
    t_all = time.perf_counter()

    # ---- 1. data
    problems = read_jsonl(inputs.gsm8k)
    random.Random(1234).shuffle(problems)
    heldout = problems[-args.heldout_docs:]
    sft = []
    for record in problems[: -args.heldout_docs]:
        example = gsm8k_tora(record)
        if example is not None:
            sft.append(example)
        if len(sft) == args.sft_docs:
            break
    write_jsonl(out / "data" / "general.jsonl", [{"text": t} for p in inputs.wikitext for t in wikitext_paragraphs(p)])
    write_jsonl(out / "data" / "sft.jsonl", sft)
    write_jsonl(out / "data" / "heldout.jsonl", heldout)
    tok = ["--tokenizer", inputs.tokenizer, "-q"]
    stage("tokenize", [
        ["tokenize", out / "data" / "general.jsonl", "--output", out / "tokens" / "general", *tok],
        ["tokenize", out / "data" / "sft.jsonl", "--output", out / "tokens" / "sft", "--prompt-key", "question",
         "--response-key", "solution", "--chat-template", "tora", "--mask-spans", "output",
         "--seq-length", args.seq_length, "--on-error", "skip", *tok],
    ])

    # ---- 2. base and SFT
    base = args.init or out / "runs" / "base"
    if not args.init:
        stage("train base (general text)", [["train", args.config, "--data", out / "tokens" / "general",
                                             "--save", base, "--steps", args.base_steps, "--eval-interval", 100, "-q"]])
    sft_run = out / "runs" / "sft"
    stage("train SFT (response tokens, packed apart)", [[
        "train", args.config, "--init", base, "--data", out / "tokens" / "sft", "--mask", out / "tokens" / "sft.mask",
        "--pack", "whole", "--separate-documents", "--epochs", args.epochs, "--seq-length", args.seq_length, "--lr", args.lr,
        "--set", "train.split=95,5,0", "--set", "train.warmup_steps=10", "--eval-interval", 20, "--save", sft_run, "-q"]])
    sft_steps = read_metrics(sft_run)["valid"][-1][0]

    # ---- 3. rho eval --prompt tora: the base (never saw the format) and the SFT model
    evals = {"base": base, "sft": sft_run}
    stage("rho eval --prompt tora", [
        ["eval", model, "--task", "gsm8k", "--data", out / "data" / "heldout.jsonl", "--prompt", "tora",
         "--max-new-tokens", args.max_new_tokens, "--output", out / "eval" / name]
        for name, model in evals.items()])

    # ---- 4. results
    metrics = read_metrics(sft_run)
    rows = {}
    for name in evals:
        m = read_json(out / "eval" / name / METRICS_NAME)
        outputs = read_outputs(out / "eval" / name / OUTPUTS_NAME)
        rows[name] = {"accuracy": m.get("acc"), "problems": len(outputs),
                      "ran_a_program": sum(1 for o in outputs if "```output" in "".join(o.get("code") or [])),
                      "metrics": m}
    results = {"sft_examples": len(sft), "heldout_problems": len(heldout), "sft_steps": sft_steps,
               "heldout_response_loss": metrics["valid"], "eval": rows, "seconds": recipe.runner.timings,
               "total_seconds": time.perf_counter() - t_all}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = [f"SFT: {len(sft)} examples, {sft_steps} steps; held-out response loss "
             f"{metrics['valid'][0][1]:.4f} (step {metrics['valid'][0][0]}) -> {metrics['valid'][-1][1]:.4f} "
             f"(step {metrics['valid'][-1][0]})", "",
             "| model | accuracy (rho eval --prompt tora) | completions that ran a program |", "|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['accuracy']} | {r['ran_a_program']} of {r['problems']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"total {results['total_seconds']:.0f} s; everything is under {out}")
    return 0


if __name__ == "__main__":
    from rhocli.app import run_recipe

    sys.exit(run_recipe(main))
