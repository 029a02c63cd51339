"""The CLI surface: stages listed, version, lazy imports, the error model and its documented codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rho_cli import run_rho
from rhocli import __version__
from rhocli.core.errors import ENGINE_ERRORS, EXIT_CODES

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["tokenize", "train", "score", "select", "convert-hf", "demo", "bench", "verify"]


def test_help_lists_every_stage(capsys):
    r = run_rho(capsys, "--help")
    assert r.exit_code == 0
    for stage in STAGES:
        assert re.search(rf"│ {re.escape(stage)}\s", r.stdout), stage


def test_version(capsys):
    r = run_rho(capsys, "--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"rho {__version__}"


def test_cli_import_is_light():
    """`rho --help` must not pay for torch / megatron-core (seconds): they are imported lazily."""
    code = "import sys, rhocli.app; print(sorted(m for m in ('torch', 'megatron', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_flag_is_a_usage_error(capsys):
    r = run_rho(capsys, "tokenize", "--no-such-flag")
    assert r.exit_code == 2


def test_tokenize_cli_surface_is_frozen(capsys):
    """Renaming or dropping a flag breaks users' scripts: change this list only on purpose."""
    r = run_rho(capsys, "tokenize", "--help")
    flags = set(re.findall(r"(--[a-z][a-z-]+)", r.stdout))
    assert flags == {
        "--tokenizer", "--output", "--json-key", "--key-separator", "--txt-mode", "--workers",
        "--append-eod", "--no-append-eod", "--prepend-bos", "--no-prepend-bos", "--on-error",
        "--force", "--config", "--quiet", "--help",
        "--prompt-key", "--response-key", "--messages-key", "--chat-template", "--mask-spans", "--seq-length",
    }


def test_debug_env_shows_traceback(tmp_path):
    env = dict(os.environ, RHO_DEBUG="1")
    proc = subprocess.run(
        [sys.executable, "-m", "rhocli", "tokenize", str(tmp_path / "missing.jsonl"), "-t", "x.model", "-o", str(tmp_path / "o")],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 3
    assert "Traceback" in proc.stderr and "missing.jsonl: input file not found" in proc.stderr
    env.pop("RHO_DEBUG")
    proc = subprocess.run(
        [sys.executable, "-m", "rhocli", "tokenize", str(tmp_path / "missing.jsonl"), "-t", "x.model", "-o", str(tmp_path / "o")],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:")


def test_errors_doc_matches_exit_codes():
    """docs/errors.md documents every error class with its exit code, and nothing else."""
    text = (ROOT / "docs" / "errors.md").read_text()
    documented = {name: int(code) for name, code in re.findall(r"^\|\s*`(\w+)`\s*\|\s*(\d+)\s*\|", text, re.M)}
    assert documented == EXIT_CODES
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES), "exit codes must be distinct"
    engine = dict(re.findall(r"^\|\s*`((?:parallel|cuda_ext)\.errors\.\w+)`\s*\|\s*`(\w+)`\s*\|", text, re.M))
    assert engine == {name: cls.__name__ for name, cls in ENGINE_ERRORS.items()}


def test_engine_errors_exit_with_their_category():
    """One table, whoever raises: the engine's types map onto rho's categories; a LayoutError's sizes
    are named by their flags; anything else is a bug (exit 1)."""
    from cuda_ext.errors import KernelUnavailableError
    from parallel.errors import LayoutError, NonFiniteValueError, PreemptedError, WeightsMismatchError
    from rhocli.app import message_for
    from rhocli.core.errors import exit_code_for

    layout = LayoutError("{tp} x {pp} = 4 does not divide the world size 6", tp=2, pp=2)
    assert str(layout) == "tp 2 x pp 2 = 4 does not divide the world size 6"
    assert message_for(layout) == "--tp 2 x --pp 2 = 4 does not divide the world size 6"
    assert exit_code_for(layout) == 2
    assert exit_code_for(NonFiniteValueError("loss is nan")) == 11
    assert exit_code_for(PreemptedError("SIGTERM", 3)) == 12
    assert exit_code_for(WeightsMismatchError("x")) == 9
    assert exit_code_for(KernelUnavailableError("x")) == 7

    class Sub(WeightsMismatchError):
        pass

    assert exit_code_for(Sub("x")) == 9
    assert exit_code_for(KeyError("x")) == 1 and exit_code_for(ValueError("x")) == 1


@pytest.mark.parametrize("name", ["[/x]", "[bold]x", "[red]"])
def test_messages_print_user_text_literally(tmp_path, capsys, name):
    """A path holding Rich markup is printed as it is, with the intended exit code (no traceback)."""
    missing = tmp_path / name / "in.jsonl"
    r = run_rho(capsys, "tokenize", missing, "-t", tmp_path / "t.model", "-o", tmp_path / "o")
    assert r.exit_code == 3, r.stderr
    # brackets make the path a glob pattern: "no files match", with the path exactly as given
    assert r.stderr.strip() == f"error: {missing}: no files match"


def test_results_print_user_text_literally(tmp_path, capsys, hf_tokenizer_dir):
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    prefix = tmp_path / "[bold]out"
    r = run_rho(capsys, "tokenize", tmp_path / "d.jsonl", "-t", hf_tokenizer_dir, "-o", prefix, "-w", "1")
    assert r.exit_code == 0, r.stderr
    assert f"wrote{prefix}.bin/.idx/.json" in "".join(r.stdout.split())  # wrapped at the console width
