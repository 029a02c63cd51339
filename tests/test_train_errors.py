"""Bad config / data / layout for rho train: one clear line and the class's exit code, before any
process group exists (these run in-process and never start workers)."""

from __future__ import annotations

import pytest

from conftest import CORPUS, write_jsonl
from rho_cli import run_rho
from train_utils import write_tiny_config


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, hf_tokenizer_dir):
    from rhocli.tokenize.pipeline import TokenizeConfig, run_tokenize

    d = tmp_path_factory.mktemp("errdata")
    write_jsonl(d / "c.jsonl", [{"text": t} for t in CORPUS])
    run_tokenize(TokenizeConfig(inputs=(str(d / "c.jsonl"),), tokenizer=str(hf_tokenizer_dir), output=str(d / "c"), workers=1))
    return d / "c"


def _train(capsys, tmp_path, data, *extra):
    config = write_tiny_config(tmp_path)
    return run_rho(capsys, "train", config, "--data", data, "--save", tmp_path / "run", *extra)


def test_tp_pp_must_divide_world_size(capsys, tmp_path, small_data, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    r = _train(capsys, tmp_path, small_data, "--tp", "2")
    assert r.exit_code == 2 and "--tp 2 x --pp 1 = 2 does not divide the world size 3" in r.stderr


def test_heads_must_divide_by_tp(capsys, tmp_path, small_data):
    r = _train(capsys, tmp_path, small_data, "--tp", "8", "--dry-run")
    assert r.exit_code == 2 and "--tp 8 must divide num_attention_heads=4" in r.stderr


def test_layers_must_divide_by_pp(capsys, tmp_path, small_data):
    r = _train(capsys, tmp_path, small_data, "--pp", "3", "--dry-run")
    assert r.exit_code == 2 and "--pp 3 must divide num_layers=4" in r.stderr


def test_missing_data(capsys, tmp_path):
    r = _train(capsys, tmp_path, tmp_path / "nope")
    assert r.exit_code == 3 and "nope.bin: token dataset file not found" in r.stderr


def test_vocab_that_does_not_fit_the_model(capsys, tmp_path, small_data):
    r = _train(capsys, tmp_path, small_data, "--set", "model.vocab_size=100")
    assert r.exit_code == 6 and "does not fit the model's vocab_size 100" in r.stderr


def test_unknown_option_and_bad_value(capsys, tmp_path, small_data):
    r = _train(capsys, tmp_path, small_data, "--set", "train.lrr=1")
    assert r.exit_code == 8 and "unknown option 'lrr'" in r.stderr
    r = _train(capsys, tmp_path, small_data, "--set", "train.optimizer=lion")
    assert r.exit_code == 8 and "expected one of 'adam' | 'sgd'" in r.stderr


def test_batch_must_split_into_micro_batches(capsys, tmp_path, small_data):
    r = _train(capsys, tmp_path, small_data, "--global-batch-size", "6", "--dp", "2")
    assert r.exit_code == 2 and "global_batch_size 6 is not a multiple of micro_batch_size 2 x data-parallel size 2" in r.stderr


def test_existing_run_needs_resume_or_force(capsys, tmp_path, small_data):
    run = tmp_path / "run"
    (run / "step_000001").mkdir(parents=True)
    (run / "step_000001" / "rho_checkpoint.json").write_text('{"format": "rho.checkpoint", "format_version": 1}')
    (run / "latest").write_text("step_000001\n")
    r = _train(capsys, tmp_path, small_data)
    assert r.exit_code == 5 and "pass --resume to continue or --force" in r.stderr


def test_dry_run_prints_the_plan_and_starts_nothing(capsys, tmp_path, small_data):
    r = _train(capsys, tmp_path, small_data, "--tp", "2", "--pp", "2", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "world 4 = tp 2 x pp 2 x dp 1" in r.stdout and "valid" in r.stdout
    assert not (tmp_path / "run").exists()
