"""I/O errors are user errors (issue 27): a full disk or a read-only filesystem ends any stage in one
line naming the path and the cause, exit 14 (docs/errors.md), with the partial output removed and what
was there untouched; a checkpoint save included. Real filesystems: a small tmpfs and a read-only one,
mounted here where the machine allows it (root, as CI runs), skipped otherwise."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import write_jsonl
from rho_cli import run_rho
from train_utils import rho, write_tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture
def tmpfs():
    """``tmpfs(options)``: a tmpfs mounted for the test (skipped where mounting is not allowed),
    unmounted after it."""
    mounted = []

    def mount(options: str) -> Path:
        path = Path("/tmp") / f"rho-fs-{uuid.uuid4().hex[:10]}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            path.rmdir()
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)
        path.rmdir()


@pytest.fixture
def full_fs(tmpfs):
    return tmpfs("size=700k")


@pytest.fixture
def checkpoint_fs(tmpfs):
    """Room for one checkpoint of the tiny model (~1 MB), not two."""
    return tmpfs("size=1600k")


@pytest.fixture
def readonly_fs(tmpfs):
    return tmpfs("ro,size=1m")


def test_a_full_disk_in_tokenize_is_one_line_and_leaves_nothing(full_fs, tmp_path, hf_tokenizer_dir, capsys):
    write_jsonl(tmp_path / "big.jsonl", [{"text": "word " * 4000} for _ in range(120)])
    r = run_rho(capsys, "tokenize", tmp_path / "big.jsonl", "-t", hf_tokenizer_dir, "-o", full_fs / "out" / "c", "-w", "1")
    assert r.exit_code == 14 and r.stderr.count("\n") == 1, r.stderr
    assert f"{full_fs / 'out' / 'c.bin'}: No space left on device" in r.stderr
    assert list(full_fs.iterdir()) == []  # no .rho-tmp, not even the directory made for it


def test_a_read_only_output_is_one_line(readonly_fs, small_data, tmp_path, hf_tokenizer_dir, capsys):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a few words"}])
    r = run_rho(capsys, "tokenize", tmp_path / "c.jsonl", "-t", hf_tokenizer_dir, "-o", readonly_fs / "c")
    assert r.exit_code == 14 and "Read-only file system" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    config = write_tiny_config(tmp_path)
    r = rho("train", config, "--data", small_data, "--save", readonly_fs / "run", "--steps", 2, "-q", check=False)
    assert r.returncode == 14 and "Read-only file system" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert list(readonly_fs.iterdir()) == []


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_checkpoint(checkpoint_fs, small_data, tmp_path):
    config = write_tiny_config(tmp_path)
    run = checkpoint_fs / "run"
    # the first checkpoint fits (the tiny model: ~250 kB); the second does not
    r = rho("train", config, "--data", small_data, "--save", run, "--steps", 4, "--save-interval", 2, "-q", check=False)
    assert r.returncode == 14, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "checkpoint of step" in r.stderr and "no space left" in r.stderr, r.stderr
    assert (run / "latest").read_text().strip() == "step_000002"
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    manifest = json.loads((run / "step_000002" / "rho_checkpoint.json").read_text())
    assert manifest["step"] == 2
