"""Bad config / data / layout for rho train: one clear line and the class's exit code, before any
process group exists (these run in-process and never start workers)."""

from __future__ import annotations

import pytest

from rho_cli import run_rho
from train_utils import write_tiny_config


def _train(capsys, tmp_path, data, *extra):
    config = write_tiny_config(tmp_path)
    return run_rho(capsys, "train", config, "--data", data, "--save", tmp_path / "run", *extra)


def test_tp_pp_must_divide_world_size(capsys, tmp_path, small_data, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    r = _train(capsys, tmp_path, small_data, "--tp", "2")
    assert r.exit_code == 2 and "--tp 2 x --pp 1 = 2 does not divide the world size 3" in r.stderr


def test_context_parallel_needs_sequences_it_can_split(capsys, tmp_path, small_data):
    r = _train(capsys, tmp_path, small_data, "--cp", "3", "--dry-run")
    assert r.exit_code == 2 and "--cp 3 chunks: the sequence length 32 must be a multiple of 6" in r.stderr, r.stderr
    r = _train(capsys, tmp_path, small_data, "--cp", "2", "--dry-run")
    assert r.exit_code == 0 and "x cp 2 x" in " ".join(r.stdout.split()), r.stdout


def test_heads_must_divide_by_tp(capsys, tmp_path, small_data):
    r = _train(capsys, tmp_path, small_data, "--tp", "8", "--dry-run")
    assert r.exit_code == 2 and "--tp 8 must divide num_attention_heads=4" in r.stderr


def test_layers_must_divide_by_pp(capsys, tmp_path, small_data):
    r = _train(capsys, tmp_path, small_data, "--pp", "3", "--dry-run")
    assert r.exit_code == 2 and "--pp 3 must divide num_layers=4" in r.stderr


def test_recompute_settings_megatron_cannot_run_are_refused(capsys, tmp_path, small_data):
    # megatron-core 0.16's uniform recompute indexes past the stage's last layer (IndexError)
    r = _train(capsys, tmp_path, small_data, "--recompute", "full", "--set", "train.recompute_num_layers=3", "--dry-run")
    assert r.exit_code == 2 and "recompute_num_layers 3 must divide the 4 layers" in r.stderr, r.stderr
    r = _train(capsys, tmp_path, small_data, "--recompute", "full", "--pp", "2", "--set", "train.recompute_num_layers=2", "--dry-run")
    assert r.exit_code == 0, r.stderr
    r = _train(capsys, tmp_path, small_data, "--recompute", "selective", "--set", "train.recompute_modules=[layernorm]", "--dry-run")
    assert r.exit_code == 7 and "Transformer Engine" in r.stderr, r.stderr


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


def _copy_store(src, dst) -> None:
    import shutil

    for ext in (".bin", ".idx", ".json"):
        shutil.copy(f"{src}{ext}", f"{dst}{ext}")


@pytest.mark.parametrize("damage, code, words", [
    ("other_bin", 4, [".bin: ", "belongs to another store"]),
    ("short_bin", 4, [".bin: ", "is truncated"]),
    ("short_idx", 4, [".idx: ", "truncated or damaged"]),
    ("other_manifest", 4, [".json: says", "the manifest belongs to another store"]),
])
def test_damaged_token_stores_are_refused_on_open(capsys, tmp_path, small_data, hf_tokenizer_dir, damage, code, words):
    """The store's files are checked against each other and its manifest before anything reads them:
    one line naming the file, exit 4, no traceback (megatron's reader would crash, or read garbage)."""
    import json

    from rhocli.tokenize.pipeline import TokenizeConfig, run_tokenize

    bad = tmp_path / "bad"
    _copy_store(small_data, bad)
    if damage == "other_bin":  # another dataset's .bin under this .idx
        (tmp_path / "o.jsonl").write_text('{"text": "a different and much shorter corpus"}\n')
        run_tokenize(TokenizeConfig(inputs=(str(tmp_path / "o.jsonl"),), tokenizer=str(hf_tokenizer_dir),
                                    output=str(tmp_path / "o"), workers=1))
        (tmp_path / "bad.bin").write_bytes((tmp_path / "o.bin").read_bytes())
    elif damage == "short_bin":
        data = (tmp_path / "bad.bin").read_bytes()
        (tmp_path / "bad.bin").write_bytes(data[:-1000])
    elif damage == "short_idx":
        data = (tmp_path / "bad.idx").read_bytes()
        (tmp_path / "bad.idx").write_bytes(data[:-20])
    else:  # a manifest that describes another dataset
        manifest = json.loads((tmp_path / "bad.json").read_text())
        manifest["documents"] += 7
        (tmp_path / "bad.json").write_text(json.dumps(manifest))
    r = _train(capsys, tmp_path, bad, "--dry-run")
    assert r.exit_code == code, r.stderr
    assert all(w in r.stderr for w in words) and str(bad) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr


@pytest.mark.parametrize("where, option, value, code, message", [
    ("set", "model.num_attention_heads", "-4", 8, "option 'num_attention_heads' must be >= 1, got -4"),
    ("set", "model.num_layers", "0", 8, "option 'num_layers' must be >= 1, got 0"),
    ("set", "model.hidden_size", "0", 8, "option 'hidden_size' must be >= 1, got 0"),
    ("set", "model.norm_epsilon", "-1e-5", 8, "option 'norm_epsilon' must be > 0"),
    ("set", "train.seq_length", "0", 8, "option 'seq_length' must be >= 1, got 0"),
    ("set", "train.warmup_steps", "-5", 8, "option 'warmup_steps' must be >= 0, got -5"),
    ("set", "train.clip_grad", "-1", 8, "option 'clip_grad' must be >= 0"),
    ("set", "train.eval_iters", "-2", 8, "option 'eval_iters' must be >= 0"),
    ("flag", "--micro-batch-size", "0", 2, "--micro-batch-size must be >= 1, got 0"),
    ("flag", "--lr", "-0.1", 2, "--lr must be >= 0, got -0.1"),
    ("flag", "--save-interval", "-1", 2, "--save-interval must be >= 0, got -1"),
    ("flag", "--select-ratio", "1.5", 2, "--select-ratio must be (0, 1], got 1.5"),
    ("flag", "--select-ratio", "1.2:0.5", 2, "--select-ratio 1.2:0.5: expected a fraction in (0, 1] (0.6), or START:END"),
    ("flag", "--select-ratio", "0.6:", 2, "--select-ratio 0.6:: expected a fraction"),
    ("flag", "--select-after", "-1", 2, "--select-after must be >= 0, got -1"),
])
def test_every_option_is_range_checked_where_it_is_parsed(capsys, tmp_path, small_data, where, option, value, code, message):
    """Out-of-range values are one line and the right code, even with --dry-run (they used to be an
    internal error, a SIGFPE, or accepted)."""
    extra = ["--set", f"{option}={value}"] if where == "set" else [option, value]
    r = _train(capsys, tmp_path, small_data, "--dry-run", *extra)
    assert r.exit_code == code and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_save_naming_a_file_and_yaml_errors_say_where(capsys, tmp_path, small_data):
    (tmp_path / "afile").write_text("x")
    r = run_rho(capsys, "train", write_tiny_config(tmp_path), "--data", small_data, "--save", tmp_path / "afile", "--dry-run")
    assert r.exit_code == 2 and "is a file; give a run directory" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 4\n  hidden_size: [64\n")
    r = run_rho(capsys, "train", bad, "--data", small_data, "--save", tmp_path / "run", "--dry-run")
    assert r.exit_code == 8 and f"{bad}:4: not valid YAML" in r.stderr, r.stderr


@pytest.mark.parametrize("extra, message", [
    (["--select-by", "perplexity", "--select-ratio", "0.6"], "--select-by 'perplexity': expected one of excess, reference"),
    (["--select-by", "reference", "--select-ratio", "0.6"], "--select-by reference needs --scores SCORES_PREFIX"),
    (["--select-by", "entropy|random", "--select-ratio", "0.6"], "--select-by entropy|random needs --scores"),
    (["--select-after", "2"], "--select-after needs --select-ratio"),
    (["--select-by", "random"], "--select-by needs --select-ratio"),
    (["--lr", "0.001"], "--lr 0.001 is below min_lr 0.005"),
    (["--epochs", "0"], "--epochs 0: expected a number of passes > 0"),
    (["--pack", "tight"], "--pack: expected stream or whole, got 'tight'"),
])
def test_score_functions_are_checked_before_anything_runs(capsys, tmp_path, small_data, extra, message):
    r = _train(capsys, tmp_path, small_data, "--dry-run", *extra)
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
