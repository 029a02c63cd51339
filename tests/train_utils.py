"""Helpers for `rho train` tests: a tiny model config, a tiny token dataset, running rho (in a
subprocess for the stages that start process groups: training applies process-wide CPU shims and
process groups, so it never runs in the pytest process), and reading results back."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TINY_MODEL_YAML = """
model:
  num_layers: 4
  hidden_size: 64
  ffn_hidden_size: 128
  num_attention_heads: 4
  num_query_groups: 2
  max_position_embeddings: 128
train:
  steps: 3
  seq_length: 32
  micro_batch_size: 2
  global_batch_size: 8
  lr: 0.05
  min_lr: 0.005
  warmup_steps: 1
  optimizer: sgd
  weight_decay: 0.0
  clip_grad: 0.0
  eval_interval: 0
  eval_iters: 2
  split: "90,10,0"
  log_interval: 1
"""


def write_tiny_config(directory: Path, extra: str = "") -> Path:
    path = Path(directory) / "tiny_test.yaml"
    path.write_text(TINY_MODEL_YAML + extra)
    return path


# commands that hold no process-wide state (no process group, no CPU shim): run in the test process,
# which saves each call the ~5 s import of torch and megatron-core a new process pays
IN_PROCESS = {"tokenize", "select", "verify"}


def rho(*args, env_extra: dict | None = None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    export = str(args[0]) == "convert-hf" and "--from-hf" not in map(str, args)  # reads files, no process group
    if (str(args[0]) in IN_PROCESS or export) and not env_extra:
        proc = _in_process([str(a) for a in args])
    else:
        proc = _subprocess(args, env_extra, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"rho {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _in_process(argv: list[str]) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from rhocli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["rho", *argv], code, out.getvalue(), err.getvalue())


def _subprocess(args, env_extra: dict | None, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.Popen([sys.executable, "-m", "rhocli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stacks_then_kill(proc)
        raise AssertionError(f"rho {' '.join(map(str, args))} did not end in {timeout:.0f} s; the Python stacks "
                             f"of its processes when it was stopped (last 12000 characters):\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stacks_then_kill(proc: subprocess.Popen) -> tuple[str, str]:
    """A run that hangs: SIGUSR1 to it and every process it started (each prints its threads' stacks
    to the shared stderr: rho's faulthandler), then SIGKILL to all; returns what they printed."""
    import signal

    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGUSR1)
    time.sleep(3)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return proc.communicate()


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def grad_norms(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["grad_norm"] for r in records if r.get("grad_norm") is not None}


def valid_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["valid_loss"] for r in records if r.get("valid_loss") is not None}


def model_tensors(step_dir: Path):
    from rhocli.core.formats.checkpoint import load_model_tensors

    return load_model_tensors(step_dir)
