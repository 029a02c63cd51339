"""What the experiment recipes (``experiments/*.py``) share: the inputs they read under ``--shared``,
the rule for their output directory, and the stage runner that runs rho command lines through the
entry a recipe passes in (``rhocli.app.invoke``; core never imports the CLI) and, with ``--reuse``,
keeps those whose outputs are already complete. Nothing here prints: progress goes to ``log``.

A recipe's ``--reuse`` keeps finished stages, so it must never mix two corpora: ``record_settings``
writes the settings that decide the data (and the models trained on it) beside the outputs and
refuses a reuse made with others.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rhocli.core.errors import MismatchError, MissingInputError, OutputExistsError
from rhocli.core.formats.checkpoint import latest_step_dir, read_manifest, step_dir_name

SETTINGS_NAME = "data_settings.json"


@dataclass(frozen=True)
class SharedInputs:
    """The files the recipes read from the shared directory (never copied into the project)."""

    gsm8k: Path  # GSM8K train, one JSON problem per line
    wikitext: tuple[Path, ...]  # WikiText-2 valid and test, raw text
    tokenizer: Path  # the Llama-2 SentencePiece model


def shared_inputs(shared: Path) -> SharedInputs:
    """The recipe inputs under ``shared``; raises MissingInputError naming the first one missing."""
    inputs = SharedInputs(gsm8k=shared / "data" / "gsm8k" / "train.jsonl",
                          wikitext=tuple(shared / "data" / "wikitext-2" / f"{s}.txt" for s in ("valid", "test")),
                          tokenizer=shared / "tokenizers" / "llama2" / "tokenizer.model")
    for path in (inputs.gsm8k, *inputs.wikitext, inputs.tokenizer):
        if not path.is_file():
            raise MissingInputError(f"{path}: not found (pass --shared DIR)")
    return inputs


def prepare_output(out: Path, subdirs: Sequence[str], *, force: bool, reuse: bool) -> None:
    """Creates ``out`` and its ``subdirs``; a non-empty ``out`` needs --force or --reuse."""
    if out.exists() and any(out.iterdir()) and not (force or reuse):
        raise OutputExistsError(f"--output {out}: not empty; pass --force (or --reuse)")
    for sub in subdirs:
        (out / sub).mkdir(parents=True, exist_ok=True)


def record_settings(out: Path, settings: dict[str, Any], *, reuse: bool) -> None:
    """Writes ``settings`` to ``out/data_settings.json``; with ``reuse``, first refuses an output
    whose recorded settings differ (its finished stages belong to other data)."""
    recorded = out / SETTINGS_NAME
    if reuse and recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise MismatchError(f"--reuse {out}: made with other data or model settings ({recorded}); use another --output")
    recorded.write_text(json.dumps(settings, indent=1) + "\n")


def option(command: Sequence[str], flag: str) -> str:
    """The value that follows ``flag`` in a command line."""
    return command[command.index(flag) + 1]


def finished(command: Sequence[str]) -> bool:
    """Whether a rho command's output is complete: a dataset's or score store's manifest is written
    last; a training run is complete when its ``latest`` checkpoint is the run's last step (the
    command's --steps, or the steps its checkpoint's config resolved, e.g. from --epochs; metrics
    alone are not enough: a run stopped between its last validation and its checkpoint has them).
    ``select`` and anything else: never (cheap, always redone)."""
    verb = command[0]
    if verb in ("tokenize", "score"):
        return Path(f"{option(command, '--output')}.json").is_file()
    if verb == "train":
        latest = latest_step_dir(option(command, "--save"))
        if latest is None:
            return False
        if "--steps" in command:
            return latest.name == step_dir_name(int(option(command, "--steps")))
        manifest = read_manifest(latest)
        return manifest.get("step") == ((manifest.get("config") or {}).get("train") or {}).get("steps")
    return False


@dataclass
class StageRunner:
    """Runs a recipe's stages: each stage a list of rho command lines, through ``invoke``.

    With ``reuse``, a command whose output is complete is kept. Every command that runs gets
    ``--force``: the recipe owns its output directory (``prepare_output`` asked for --force or
    --reuse before anything was there to replace), so what an earlier or killed run of the recipe
    left there is replaced, never mixed in. ``rho eval`` resumes instead (it keeps the problems it
    finished when its settings, the model's fingerprint included, are the same) and is forced only
    when they are not. ``timings`` holds each stage's seconds."""

    invoke: Callable[[list[str]], None]
    reuse: bool = False
    log: Callable[[str], None] = lambda line: None
    timings: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str, commands: Sequence[Sequence[Any]]) -> None:
        t0 = time.perf_counter()
        for command in commands:
            argv = [str(x) for x in command]
            if self.reuse and finished(argv):
                self.log("kept: rho " + " ".join(argv))
                continue
            self.log("rho " + " ".join(argv))
            if argv[0] == "eval" and self.reuse and "--force" not in argv:
                try:
                    self.invoke(argv)
                    continue
                except OutputExistsError:  # an eval with other settings (another model) is there
                    self.log("  (its output holds an eval with other settings: replaced)")
            self.invoke(argv + ([] if "--force" in argv else ["--force"]))
        self.timings[name] = time.perf_counter() - t0
        self.log(f"  {name}: {self.timings[name]:.0f} s")


def add_recipe_arguments(parser: argparse.ArgumentParser, *, shared: Path, output: Path) -> None:
    """The options every recipe takes: where the inputs are, where its outputs go, and what to do
    with an earlier run's outputs (--force replaces them, --reuse keeps its finished stages)."""
    parser.add_argument("--shared", type=Path, default=shared, help="dir with data/ and tokenizers/")
    parser.add_argument("--output", type=Path, default=output)
    parser.add_argument("--force", action="store_true", help="replace what --output holds")
    parser.add_argument("--reuse", action="store_true",
                        help="keep what an earlier run in --output finished (token datasets, score stores, runs that "
                             "reached their last step) and run only the rest; the data split is deterministic")


@dataclass(frozen=True)
class Recipe:
    """A started recipe: its inputs, its output directory and the runner of its stages."""

    inputs: SharedInputs
    out: Path
    runner: StageRunner


def start_recipe(args: argparse.Namespace, *, subdirs: Sequence[str], settings: Sequence[str],
                 invoke: Callable[[list[str]], None], log: Callable[[str], None]) -> Recipe:
    """The start every recipe makes, in this order (nothing is written before the inputs are
    found): its inputs under --shared, its --output directory with ``subdirs``, the recorded values
    of the options named in ``settings`` (those that decide the data and the models trained on it;
    a --reuse with others is refused), and a stage runner over ``invoke``."""
    inputs = shared_inputs(args.shared)
    prepare_output(args.output, subdirs, force=args.force, reuse=args.reuse)
    record_settings(args.output, {k: getattr(args, k) for k in settings}, reuse=args.reuse)
    return Recipe(inputs, args.output, StageRunner(invoke, reuse=args.reuse, log=log))
