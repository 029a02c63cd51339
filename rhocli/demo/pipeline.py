"""``rho demo`` as a library: the whole pipeline on the demo's own corpus, through the real commands.

Every stage is the real ``rho`` command line, run through the entry function the caller passes
(``rhocli.app.invoke``: in this process, exactly what a user types; with ``--tp/--pp`` the train and
score stages start their worker processes as usual). The stage's command line is reported so it can
be re-run by hand.

Layout of the output directory (everything the demo writes is under it):

    data/       generated text (*.jsonl), token kinds (*.kinds.jsonl), the trained tokenizer
    tokens/     token datasets (rho tokenize)
    runs/       reference, clm, slm (rho train: checkpoints, metrics.jsonl)
    scores/     score stores (rho score): reference losses of the corpus, held-out evaluations
    evals/      rho eval of CLM and SLM: greedy answers to the held-out problems, graded
    select/     the static selection of a corpus sample (rho select) and its HTML token report
    demo.yaml   the model and training settings the train stages use
    results.json, report.html
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rhocli.core.errors import OutputExistsError, UsageError
from rhocli.core.formats.metrics import read_metrics, steps_to_reach
from rhocli.demo import corpus as gen


@dataclasses.dataclass(frozen=True)
class DemoSize:
    reference_documents: int
    corpus_documents: int
    heldout_documents: int
    sample_documents: int
    reference_steps: int
    steps: int
    eval_interval: int
    accuracy_problems: int  # held-out problems CLM and SLM answer (rho eval)


SIZES = {
    # for tests: every stage runs, numbers mean little
    "tiny": DemoSize(600, 1200, 80, 40, 30, 40, 20, 24),
    # the default: a few minutes on 2 CPU cores
    "small": DemoSize(3000, 6000, 300, 200, 300, 400, 50, 200),
    # a GPU, or a patient CPU
    "large": DemoSize(12000, 30000, 1000, 400, 1200, 2000, 100, 1000),
}

# The demo model: a 4-layer Llama (about 0.9 M parameters with the 512-piece tokenizer).
MODEL = {
    "architecture": "llama",
    "num_layers": 4,
    "hidden_size": 128,
    "ffn_hidden_size": 352,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "max_position_embeddings": 256,
    "vocab_size": None,
}
TRAIN = {
    "seq_length": 128,
    "micro_batch_size": 4,
    "global_batch_size": 8,
    "lr": 1.0e-3,
    "min_lr": 1.0e-4,
    "warmup_steps": 30,
    "weight_decay": 0.1,
    "clip_grad": 1.0,
}
VOCAB_SIZE = 512
# How rho eval asks the demo models (they learned "Question: ...\nAnswer: ..." documents): zero-shot,
# one line of answer ("... = 46 marbles now. The answer is 46.").
EVAL_PROMPT = {"task": "gsm8k", "style": "demo", "query": "Question: {question}\nAnswer:", "stop": ["\n"],
               "rounds": 1, "exemplars": []}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    output: Path
    size: str = "small"
    tp: int = 1
    pp: int = 1
    ratio: float = 0.6
    seed: int = 1234
    force: bool = False


@dataclasses.dataclass
class StageEvent:
    """What the CLI shows: a stage starting (``seconds`` None) or finished."""

    index: int
    total: int
    name: str
    command: str
    seconds: float | None = None
    summary: str = ""


def check_output_dir(cfg: DemoConfig) -> None:
    out = cfg.output
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise OutputExistsError(f"--output {out}: not empty; pass --force to replace the demo there, or choose another directory")
    if cfg.size not in SIZES:
        raise UsageError(f"--size: expected one of {', '.join(SIZES)}, got {cfg.size!r}")
    if not 0.0 < cfg.ratio <= 1.0:
        raise UsageError(f"--ratio must be in (0, 1], got {cfg.ratio}")
    if cfg.tp < 1 or cfg.pp < 1:
        raise UsageError("--tp and --pp must be >= 1")
    if MODEL["num_query_groups"] % cfg.tp:
        raise UsageError(f"--tp {cfg.tp}: the demo model has {MODEL['num_query_groups']} key/value heads; use --tp 1 or 2")
    if MODEL["num_layers"] % cfg.pp:
        raise UsageError(f"--pp {cfg.pp}: the demo model has {MODEL['num_layers']} layers; use --pp 1, 2 or 4")


class DemoRun:
    """Runs the stages in order through ``run_command`` (``rho ARGV`` as a function, e.g.
    ``rhocli.app.invoke``); ``on_event`` sees each stage start and finish."""

    STAGES = ("generate", "tokenize", "train reference", "score corpus", "train CLM", "train SLM",
              "evaluate held-out", "held-out accuracy", "select sample", "report")

    def __init__(self, cfg: DemoConfig, run_command: Callable[[list[str]], None],
                 on_event: Callable[[StageEvent], None] | None = None):
        self.cfg = cfg
        self.run_command = run_command
        self.size = SIZES[cfg.size]
        self.out = cfg.output
        self.on_event = on_event or (lambda e: None)
        self.timings: dict[str, float] = {}
        self._stage_index = 0

    # ---------------------------------------------------------------- helpers
    def p(self, *parts: str) -> str:
        return str(self.out.joinpath(*parts))

    def _rho(self, args: list[str]) -> None:
        self.run_command(args)

    def _stage(self, name: str, commands: list[list[str]], body: Callable[[], str]) -> None:
        self._stage_index += 1
        shown = "\n".join("rho " + shlex.join(c) for c in commands)
        self.on_event(StageEvent(self._stage_index, len(self.STAGES), name, shown))
        t0 = time.perf_counter()
        summary = body()
        seconds = time.perf_counter() - t0
        self.timings[name] = seconds
        self.on_event(StageEvent(self._stage_index, len(self.STAGES), name, shown, seconds, summary))

    def _layout(self) -> list[str]:
        return (["--tp", str(self.cfg.tp)] if self.cfg.tp > 1 else []) + (["--pp", str(self.cfg.pp)] if self.cfg.pp > 1 else [])

    # ---------------------------------------------------------------- stages
    def run(self) -> dict[str, Any]:
        check_output_dir(self.cfg)
        if self.out.is_dir() and self.cfg.force:
            import shutil

            shutil.rmtree(self.out)
        for sub in ("data", "tokens", "runs", "scores", "select", "evals"):
            Path(self.p(sub)).mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        s, cfg = self.size, self.cfg

        self._stage("generate", [], self._generate)
        tok_cmds = [["tokenize", self.p("data", f"{n}.jsonl"), "--tokenizer", self.p("data", "tokenizer.model"),
                     "--output", self.p("tokens", n), "--workers", "1", "-q"] for n in ("reference", "corpus", "heldout", "sample")]
        self._stage("tokenize", tok_cmds, lambda: self._run_all(tok_cmds, self._tokens_summary))
        self._write_run_yaml()

        def train_cmd(run: str, data: str, steps: int, extra: list[str] = ()) -> list[str]:
            return ["train", self.p("demo.yaml"), "--data", self.p("tokens", data), "--eval-data", self.p("tokens", "heldout"),
                    "--save", self.p("runs", run), "--steps", str(steps), "--save-interval", str(steps // 2),
                    *self._layout(), *extra, "-q"]

        ref_cmd = train_cmd("reference", "reference", s.reference_steps)
        self._stage("train reference", [ref_cmd], lambda: self._train(ref_cmd, "reference"))
        score_cmd = ["score", "--model", self.p("runs", "reference"), "--data", self.p("tokens", "corpus"),
                     "--output", self.p("scores", "corpus.reference"), *self._layout(), "-q"]
        self._stage("score corpus", [score_cmd], lambda: self._run_all([score_cmd], lambda: self._score_summary("corpus.reference")))
        clm_cmd = train_cmd("clm", "corpus", s.steps)
        self._stage("train CLM", [clm_cmd], lambda: self._train(clm_cmd, "clm"))
        # microbatch scope (Rho-1 ranks tokens across the batch): with sequence scope, a sequence of
        # pure noise would still train on its "best" 60 % of noise.
        slm_cmd = train_cmd("slm", "corpus", s.steps, ["--scores", self.p("scores", "corpus.reference"),
                                                         "--select-ratio", str(cfg.ratio), "--select-scope", "microbatch"])
        self._stage("train SLM", [slm_cmd], lambda: self._train(slm_cmd, "slm"))

        eval_cmds = [["score", "--model", self.p("runs", run), "--data", self.p("tokens", "heldout"),
                      "--output", self.p("scores", f"heldout.{run}"), *self._layout(), "-q"] for run in ("reference", "clm", "slm")]
        self._stage("evaluate held-out", eval_cmds, lambda: self._run_all(eval_cmds, self._heldout_summary))
        self._write_eval_inputs()
        acc_cmds = [["eval", self.p("runs", run), "--task", "gsm8k", "--data", self.p("data", "heldout_problems.jsonl"),
                     "--prompt", self.p("data", "prompt.yaml"), "--limit", str(s.accuracy_problems),
                     "--max-new-tokens", "48", "--output", self.p("evals", run), "-q"] for run in ("clm", "slm")]
        self._stage("held-out accuracy", acc_cmds, lambda: self._run_all(acc_cmds, self._accuracy_summary))

        mid = s.steps // 2
        base = self.p("runs", "slm", f"step_{mid:06d}")
        select_cmds = [
            ["score", "--model", self.p("runs", "reference"), "--data", self.p("tokens", "sample"),
             "--output", self.p("scores", "sample.reference"), *self._layout(), "-q"],
            ["score", "--model", base, "--data", self.p("tokens", "sample"), "--output", self.p("scores", "sample.slm"),
             *self._layout(), "-q"],
            ["select", "--scores", self.p("scores", "sample.reference"), "--base-scores", self.p("scores", "sample.slm"),
             "--ratio", str(cfg.ratio), "--scope", "global", "--output", self.p("select", "sample.mask"), "--report", self.p("select", "tokens.html")],
        ]
        self._stage("select sample", select_cmds, lambda: self._run_all(select_cmds, self._select_summary))

        results = self._results(time.perf_counter() - t_start)
        self._stage("report", [], lambda: self._report(results))
        results["seconds"]["total"] = time.perf_counter() - t_start
        Path(self.p("results.json")).write_text(json.dumps(results, indent=1))
        return results

    def _run_all(self, commands: list[list[str]], summary: Callable[[], str]) -> str:
        for c in commands:
            self._rho(c)
        return summary()

    def _generate(self) -> str:
        s, seed = self.size, self.cfg.seed
        sets = {
            "reference": list(gen.clean_documents(s.reference_documents, seed + 1)),
            "corpus": list(gen.noisy_documents(s.corpus_documents, seed + 2)),
            "heldout": list(gen.clean_documents(s.heldout_documents, seed + 3)),
        }
        sets["sample"] = sets["corpus"][: s.sample_documents]
        for name, docs in sets.items():
            gen.write_jsonl(Path(self.p("data", f"{name}.jsonl")), docs)
            gen.write_kinds(Path(self.p("data", f"{name}.kinds.jsonl")), docs)
        train_sentencepiece([d.text for d in sets["reference"] + sets["corpus"]], Path(self.p("data", "tokenizer")))
        n_chars = sum(len(d.text) for docs in sets.values() for d in docs)
        return (f"{s.reference_documents:,} clean reference, {s.corpus_documents:,} noisy corpus, "
                f"{s.heldout_documents:,} held-out documents ({n_chars / 1e6:.1f} M characters); "
                f"{VOCAB_SIZE}-piece SentencePiece tokenizer")

    def _tokens_summary(self) -> str:
        from rhocli.core.formats.tokens import TokenDataset

        parts = []
        for n in ("reference", "corpus", "heldout"):
            parts.append(f"{n} {TokenDataset(self.p('tokens', n)).num_tokens:,}")
        return "tokens: " + ", ".join(parts)

    def _write_run_yaml(self) -> None:
        import yaml

        from rhocli.core.formats.tokens import TokenDataset

        heldout_tokens = TokenDataset(self.p("tokens", "heldout")).num_tokens
        # validation covers the held-out set once (whole global batches)
        eval_iters = max(1, heldout_tokens // (TRAIN["global_batch_size"] * TRAIN["seq_length"]))
        doc = {"model": dict(MODEL),
               "train": {**TRAIN, "warmup_steps": min(TRAIN["warmup_steps"], self.size.reference_steps // 5),
                         "eval_interval": self.size.eval_interval, "eval_iters": eval_iters, "seed": self.cfg.seed}}
        Path(self.p("demo.yaml")).write_text(
            "# The demo's model and training settings (rho demo writes this; rho train reads it).\n"
            + yaml.safe_dump(doc, sort_keys=False))

    def _train(self, command: list[str], run: str) -> str:
        self._rho(command)
        curve = read_metrics(Path(self.p("runs", run)))
        last = curve["valid"][-1] if curve["valid"] else (None, float("nan"))
        kept = curve["kept_fraction"]
        extra = f", kept {np.mean(kept):.0%} of tokens" if run == "slm" and kept else ""
        return f"{last[0]} steps, held-out loss {last[1]:.4f}{extra}"

    def _score_summary(self, name: str) -> str:
        manifest = json.loads(Path(self.p("scores", f"{name}.json")).read_text())
        stats = manifest.get("statistics") or {}
        return f"{manifest['token_dataset']['tokens']:,} token scores, mean reference loss {stats.get('mean', float('nan')):.3f}"

    def _heldout_summary(self) -> str:
        losses = self.heldout_losses()
        return ", ".join(f"{run} {v['all']:.4f}" for run, v in losses.items()) + " (mean held-out loss)"

    def _write_eval_inputs(self) -> None:
        """The held-out problems in GSM8K's format and the prompt that asks them (rho eval's inputs)."""
        import yaml

        docs = gen.read_kinds(Path(self.p("data", "heldout.kinds.jsonl")))
        with open(self.p("data", "heldout_problems.jsonl"), "w", encoding="utf-8") as f:
            for problem in gen.problems_of(docs):
                f.write(json.dumps(problem) + "\n")
        Path(self.p("data", "prompt.yaml")).write_text(
            "# How rho eval asks the demo's models (rho demo writes this).\n" + yaml.safe_dump(EVAL_PROMPT, sort_keys=False))

    def accuracy(self) -> dict[str, dict[str, float]]:
        """CLM's and SLM's held-out accuracy (rho eval's metrics.json)."""
        out = {}
        for run in ("clm", "slm"):
            m = json.loads(Path(self.p("evals", run, "metrics.json")).read_text())
            out[run] = {"acc": m["acc"], "problems": m["num_samples"], "no_answer": m["empty_samples"]}
        return out

    def _accuracy_summary(self) -> str:
        acc = self.accuracy()
        return (f"CLM {acc['clm']['acc']:.1f} %, SLM {acc['slm']['acc']:.1f} % of {acc['clm']['problems']} "
                "held-out problems answered right (greedy)")

    def _select_summary(self) -> str:
        kept = self.kept_by_kind()
        return "kept: " + ", ".join(f"{k} {v['kept']:.0%}" for k, v in kept.items() if v["tokens"])

    # ---------------------------------------------------------------- analysis
    def _kinds(self, name: str) -> list[np.ndarray]:
        from rhocli.core.formats.tokens import TokenDataset
        from rhocli.demo.labels import token_kinds

        ds = TokenDataset(self.p("tokens", name))
        docs = gen.read_kinds(Path(self.p("data", f"{name}.kinds.jsonl")))
        return token_kinds(self.p("data", "tokenizer.model"), docs, [ds.document(i) for i in range(ds.num_documents)])


    def heldout_losses(self) -> dict[str, dict[str, float]]:
        """Mean held-out loss per run: all tokens, and per token kind present (text, result)."""
        from rhocli.core.formats.scores import open_scores

        kinds = np.concatenate(self._kinds("heldout"))
        out = {}
        for run in ("reference", "clm", "slm"):
            values = open_scores(self.p("scores", f"heldout.{run}")).values.astype(np.float64)
            row = {"all": float(values.mean())}
            for i, k in enumerate(gen.KINDS):
                if (kinds == i).any():
                    row[k] = float(values[kinds == i].mean())
            out[run] = row
        return out

    def kept_by_kind(self) -> dict[str, dict[str, float]]:
        from rhocli.core.formats.masks import read_masks

        kinds = np.concatenate(self._kinds("sample"))
        mask = np.concatenate(read_masks(self.p("select", "sample.mask")))
        return {k: {"tokens": int((kinds == i).sum()), "kept": float(mask[kinds == i].mean()) if (kinds == i).any() else 0.0}
                for i, k in enumerate(gen.KINDS)}

    def _results(self, seconds: float) -> dict[str, Any]:
        curves = {run: read_metrics(Path(self.p("runs", run))) for run in ("reference", "clm", "slm")}
        clm_final = curves["clm"]["valid"][-1][1]
        return {
            "config": {**dataclasses.asdict(self.cfg), "output": str(self.cfg.output), "size_detail": dataclasses.asdict(self.size)},
            "curves": curves,
            "heldout": self.heldout_losses(),
            "accuracy": self.accuracy(),
            "kept_by_kind": self.kept_by_kind(),
            "slm_steps_to_clm_final": steps_to_reach(curves["slm"]["valid"], clm_final),
            "seconds": {**self.timings},
        }

    def _report(self, results: dict[str, Any]) -> str:
        from rhocli.demo.report import write_demo_report

        write_demo_report(Path(self.p("report.html")), results, self)
        return self.p("report.html")


def train_sentencepiece(texts: list[str], model_prefix: Path) -> None:
    """The demo's tokenizer: BPE, digits split, no text normalisation (its pieces spell the text, so
    token kinds can be read off character offsets)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(model_prefix), vocab_size=VOCAB_SIZE, model_type="bpe",
        split_digits=True, byte_fallback=False, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
