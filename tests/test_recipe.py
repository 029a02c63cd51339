"""The recipes' shared runner (rhocli/core/recipe.py) and their entry (rhocli.app.run_recipe): what
--reuse keeps is decided by the real stores' completion markers, every command that runs may replace
what a recipe left, and a bad recipe input is one line and rho's exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rhocli.core.errors import EXIT_CODES, MismatchError, MissingInputError, OutputExistsError
from rhocli.core.formats.checkpoint import CheckpointStore
from rhocli.core.recipe import (StageRunner, add_recipe_arguments, finished, prepare_output, record_settings,
                                shared_inputs, start_recipe)

ROOT = Path(__file__).resolve().parent.parent


def publish(run: Path, step: int, run_steps: int = 200) -> None:
    store = CheckpointStore(run)
    store.begin(step)
    store.publish(step, {"config": {"train": {"steps": run_steps}}})


def test_train_is_finished_only_at_its_last_step(tmp_path):
    run = tmp_path / "run"
    command = ["train", "cfg.yaml", "--save", str(run), "--steps", "200", "-q"]
    assert not finished(command)  # nothing there
    publish(run, 100)
    assert not finished(command)  # stopped half-way: trained again
    publish(run, 200)
    assert finished(command)
    assert not finished([*command[:-3], "--steps", "400", "-q"])  # a longer run of the same name
    by_epochs = ["train", "cfg.yaml", "--save", str(tmp_path / "sft"), "--epochs", "3"]  # steps resolved by rho train
    publish(tmp_path / "sft", 20, run_steps=45)
    assert not finished(by_epochs)
    publish(tmp_path / "sft", 45, run_steps=45)
    assert finished(by_epochs)


def test_store_is_finished_when_its_manifest_is_written(tmp_path):
    prefix = tmp_path / "scores" / "corpus.reference"
    command = ["score", "--model", "m", "--data", "d", "--output", str(prefix)]
    prefix.parent.mkdir()
    Path(f"{prefix}.loss.bin").write_bytes(b"\0" * 8)  # data without its manifest: a killed writer
    assert not finished(command)
    Path(f"{prefix}.json").write_text("{}")
    assert finished(command)
    assert not finished(["select", "--output", str(prefix)])  # cheap: always redone


def test_runner_keeps_finished_commands_and_forces_the_rest(tmp_path):
    calls = []
    run = tmp_path / "run"
    publish(run, 10)
    done = ["train", "c.yaml", "--save", run, "--steps", 10]
    todo = ["train", "c.yaml", "--save", tmp_path / "other", "--steps", 10]
    lines = []
    StageRunner(calls.append, reuse=True, log=lines.append).stage("arms", [done, todo])
    assert calls == [[str(x) for x in todo] + ["--force"]]
    assert lines[0].startswith("kept: rho train") and lines[1].startswith("rho train")
    calls.clear()
    runner = StageRunner(calls.append, reuse=False)
    runner.stage("arms", [done])  # without --reuse nothing is kept
    assert calls == [[str(x) for x in done] + ["--force"]] and set(runner.timings) == {"arms"}


def test_eval_resumes_and_is_forced_only_when_its_settings_differ(tmp_path):
    calls = []

    def invoke(argv):
        calls.append(argv)
        if "--force" not in argv and argv[-1] == "changed":
            raise OutputExistsError("--output x: holds an eval with other settings (model_fingerprint)")

    runner = StageRunner(invoke, reuse=True)
    runner.stage("eval", [["eval", "m", "--output", "same"], ["eval", "m", "--output", "changed"]])
    assert calls == [["eval", "m", "--output", "same"], ["eval", "m", "--output", "changed"],
                     ["eval", "m", "--output", "changed", "--force"]]


def test_output_and_settings_rules(tmp_path):
    out = tmp_path / "out"
    prepare_output(out, ("data", "runs"), force=False, reuse=False)
    assert (out / "runs").is_dir()
    with pytest.raises(OutputExistsError, match=str(out)):
        prepare_output(out, ("data",), force=False, reuse=False)
    prepare_output(out, ("data",), force=False, reuse=True)
    record_settings(out, {"noise_docs": 1500}, reuse=False)
    record_settings(out, {"noise_docs": 1500}, reuse=True)
    with pytest.raises(MismatchError, match="data_settings.json"):
        record_settings(out, {"noise_docs": 0}, reuse=True)
    assert json.loads((out / "data_settings.json").read_text()) == {"noise_docs": 1500}  # not overwritten
    with pytest.raises(MissingInputError, match="train.jsonl"):
        shared_inputs(tmp_path / "nowhere")


def test_start_recipe_checks_inputs_before_writing_and_refuses_a_reuse_with_other_data(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser, shared=tmp_path / "shared", output=tmp_path / "out")
    parser.add_argument("--docs", type=int, default=10)
    start = dict(subdirs=("data", "runs"), settings=("docs",), invoke=lambda argv: None, log=lambda line: None)
    with pytest.raises(MissingInputError, match="shared"):
        start_recipe(parser.parse_args([]), **start)
    assert not (tmp_path / "out").exists()
    for path in ("data/gsm8k/train.jsonl", "data/wikitext-2/valid.txt", "data/wikitext-2/test.txt",
                 "tokenizers/llama2/tokenizer.model"):
        (tmp_path / "shared" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "shared" / path).write_text("x")
    recipe = start_recipe(parser.parse_args([]), **start)
    assert recipe.out == tmp_path / "out" and (recipe.out / "runs").is_dir() and not recipe.runner.reuse
    assert recipe.inputs.tokenizer == tmp_path / "shared" / "tokenizers" / "llama2" / "tokenizer.model"
    with pytest.raises(OutputExistsError):  # not empty: --force or --reuse
        start_recipe(parser.parse_args([]), **start)
    assert start_recipe(parser.parse_args(["--reuse"]), **start).runner.reuse
    with pytest.raises(MismatchError):
        start_recipe(parser.parse_args(["--reuse", "--docs", "20"]), **start)
    start_recipe(parser.parse_args(["--force", "--docs", "20"]), **start)
    assert json.loads((tmp_path / "out" / "data_settings.json").read_text()) == {"docs": 20}


@pytest.mark.parametrize("recipe", ["continual.py", "gsm8k_wikitext.py", "sft_tora.py"])
def test_recipe_reports_a_missing_input_in_one_line(tmp_path, recipe):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / recipe), "--shared", str(tmp_path / "nowhere"),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_CODES["MissingInputError"], proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert len(lines) == 1 and "nowhere" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the inputs were checked
