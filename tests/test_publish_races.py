"""Outputs no race can break (issue 27): ``rho convert-hf`` takes its output's lock, stages in a
directory with a unique name, deletes nothing it did not create, and with --force removes the old
output only once the new one is in place. Real processes, killed and raced at the moment that matters
(held there by the RHO_FAULT_SLEEP_IN_* test hooks of ``formats/staging.py``); the ground truth of a
complete export is transformers loading it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _start(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rhocli", "convert-hf", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _loads_in_transformers(path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_two_concurrent_exports_one_refused_the_other_complete(tmp_path, llama_tp2pp2):
    out = tmp_path / "hf"
    # both start at once; whichever takes the output's lock first holds it through its publish (held
    # a few seconds by the test hook), and the other must be refused naming it
    hold = {"RHO_FAULT_SLEEP_IN_PUBLISH": "6"}
    procs = [_start(llama_tp2pp2.tp2pp2, out, "--dtype", "fp32", env=hold) for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=180), p.returncode) for p in procs]
    codes = sorted(r[3] for r in results)
    assert codes == [0, 13], results
    (winner,) = [r for r in results if r[3] == 0]
    (loser,) = [r for r in results if r[3] == 13]
    assert f"PID {winner[0]}" in loser[2] and loser[2].count("\n") == 1, loser[2]
    assert (out / "model.safetensors").is_file() and not (tmp_path / "hf.rho-lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging directory left
    _loads_in_transformers(out)


def test_an_output_that_appears_during_the_run_is_kept(tmp_path, llama_tp2pp2):
    out = tmp_path / "hf"
    proc = _start(llama_tp2pp2.tp2pp2, out, env={"RHO_FAULT_SLEEP_IN_PUBLISH": "4"})
    _wait_for(lambda: any(p.name.startswith(".rho-tmp-hf-") for p in tmp_path.iterdir()) or proc.poll() is not None)
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 5 and "appeared while rho was writing it" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_kill_in_the_force_swap_loses_neither_output(tmp_path, llama_tp2pp2, hf_tokenizer_dir):
    out = tmp_path / "hf"
    old = _start(llama_tp2pp2.tp2pp2, out, "--dtype", "fp32")
    assert old.wait(timeout=120) == 0
    (out / "mark.txt").write_text("the old export")
    proc = _start(llama_tp2pp2.tp2pp2, out, "--force", env={"RHO_FAULT_SLEEP_IN_SWAP": "30"})
    _wait_for(lambda: any(p.name.startswith(".rho-replaced-hf-") for p in tmp_path.iterdir()) or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".rho-replaced-hf-")]
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".rho-tmp-hf-")]
    assert not out.exists() and len(aside) == 1 and len(staged) == 1
    assert (aside[0] / "mark.txt").read_text() == "the old export"  # the old output, whole
    assert (staged[0] / "model.safetensors").is_file()  # the new one, whole
    # the next run on the output first puts the old one back; without --force it is then refused
    again = _start(llama_tp2pp2.tp2pp2, out)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 5 and (out / "mark.txt").read_text() == "the old export", err
    _loads_in_transformers(out)
