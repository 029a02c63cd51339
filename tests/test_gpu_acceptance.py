"""The GPU acceptance script's dry run: on a CPU every step of ``tests/gpu/run.sh`` runs at toy
sizes, so its plumbing (steps in their own time-bounded processes, the figures they collect, the
one JSON) is proven before a GPU is at hand; no target is judged without one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_of_the_gpu_acceptance_script(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "tests" / "gpu" / "run.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    report = json.loads((tmp_path / "out" / "gpu-acceptance.json").read_text())
    steps = report["steps"]
    assert proc.returncode == 0, (proc.stderr[-3000:], {n: s.get("error", s["status"]) for n, s in steps.items()})
    assert report["dry_run"] and list(steps) == ["environment", "build", "pytest_gpu", "kernel", "train", "reference", "score", "eval",
                                                  "two_gpus"]
    assert steps["environment"]["layer_backend"] == {"layer_spec": "local", "attention": "sdpa", "on_gpu": False}
    if shutil.which("nvcc"):  # ptxas' report parsed: every kernel, for every logits dtype, uses registers
        kernels = steps["build"]["kernels"]
        assert len(kernels) >= 7 and all(k["registers"] > 0 for k in kernels.values())
        assert steps["build"]["spill_bytes_total"] == sum(k["spill_stores"] + k["spill_loads"] for k in kernels.values())
    # the gpu tests are collected (and skip without CUDA), none fails
    assert steps["pytest_gpu"]["tests"] >= 20 and steps["pytest_gpu"]["failures"] == steps["pytest_gpu"]["errors"] == 0
    assert all(r["seconds"] > 0 and r["effective_gbs"] > 0 for r in steps["kernel"]["results"])
    train = steps["train"]
    assert train["plain"]["tokens_per_s_per_gpu"] > 0 and train["slm"]["tokens_per_s_per_gpu"] > 0
    assert train["slm_overhead"] == pytest.approx(train["plain"]["tokens_per_s_per_gpu"] / train["slm"]["tokens_per_s_per_gpu"] - 1, abs=0.05)
    assert steps["reference"]["skipped"] == "dry run: measured on a GPU only"
    assert steps["score"]["tokens"] > 0 and steps["score"]["tokens_per_s_whole_process"] > 0
    run = steps["eval"]["runs"]["transformers"]  # rho eval on the CPU at toy sizes: the loop and its figures
    assert steps["eval"]["device"] == "cpu" and run["problems"] == 4 and run["problems_per_s"] > 0 and run["generation_s"] >= 0
    assert steps["two_gpus"]["status"] == "skipped"
    assert set(report["verdict"].values()) == {"not measured (no GPU)"}
