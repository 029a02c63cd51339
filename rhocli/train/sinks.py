"""Where rank 0's training metrics go: ``RUN/metrics.jsonl`` (``MetricsLog``), and on request
TensorBoard event files (``--tensorboard DIR``) and a Weights & Biases run (``--wandb-project NAME``).

``RunMetrics`` is the one ``MetricsSink`` the engine's ``Trainer`` is given: it adds each step's model
TFLOP/s per device and MFU to the record, then hands the record to every sink, so all of them carry
the same names and values (TensorBoard stores float32). The optional packages are imported only
here, in a rank; ``spec.check_metric_sinks`` has checked they are installed before any rank started.

A resume cannot delete what TensorBoard or W&B already hold (``truncate_after``): TensorBoard is told
through ``SummaryWriter(purge_step=)`` to hide the killed run's events after the checkpoint; a W&B run
keeps its steps and drops lower ones it is sent again (docs/train.md, "Watching a run").
"""

from __future__ import annotations

import math
import os
import re
import secrets
from pathlib import Path
from typing import Any

#: dense bf16 peak of an H100/H200 SXM (TFLOP/s per device): the MFU reference when CUDA is present
H100_BF16_DENSE_TFLOPS = 989.0
#: the W&B run a run directory logs to (written on a fresh start, read on --resume)
WANDB_ID_NAME = "wandb-run-id"


def default_peak_tflops(peak_tflops: float | None) -> float | None:
    """The configured peak, else the H100 default with CUDA, else none (no MFU on CPU)."""
    if peak_tflops is not None:
        return peak_tflops
    import torch

    return H100_BF16_DENSE_TFLOPS if torch.cuda.is_available() else None


def throughput(flops_per_token: int, tokens_per_s: float, devices: int, peak_tflops: float | None) -> dict[str, Any]:
    """Model TFLOP/s per device (``parallel.model.flops_per_token`` · tokens/s over all devices) and
    MFU against ``peak_tflops`` (None without a peak)."""
    tflops = flops_per_token * tokens_per_s / devices / 1e12
    return {"tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """What a plotting sink can show of a record: its finite numbers, by the names metrics.jsonl
    uses. ``step`` is the x axis, not a curve; text (``skipped``), None and NaN/Inf are left out,
    as metrics.jsonl writes them as text or null."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    """TensorBoard event files in ``log_dir`` (torch's ``SummaryWriter``), one scalar per field."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = str(log_dir)
        # SummaryWriter's answer to a restart: its first event is a session START at purge_step, and
        # TensorBoard hides every older event at or after that step. A fresh run (0) replaces what
        # the directory showed before (a --force restart); a resume hides what a killed run logged
        # after its checkpoint (truncate_after). The writer opens at the first record, after both.
        self._purge_step = 0
        self._writer = None

    def truncate_after(self, step: int) -> None:
        self._purge_step = step + 1

    def append(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # flushed every 10 s (default 120) so that a TensorBoard watching the run keeps up
            self._writer = SummaryWriter(self.log_dir, purge_step=self._purge_step, flush_secs=10)
        for name, value in scalars(record).items():
            self._writer.add_scalar(name, value, global_step=int(record["step"]))

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run of this run directory: its name plus a random suffix, written to
    ``RUN/wandb-run-id`` on a fresh start and read back on --resume, so a resume continues the same
    W&B run. (A path-only id would make a --force restart in the same directory resume the replaced
    run's W&B history, where W&B drops every step up to the old run's last one.)"""
    path = run_dir / WANDB_ID_NAME
    if resuming and path.is_file():
        return path.read_text().strip()
    # W&B ids: unique in the project, no / \ # ? % : (kept to letters, digits, - and _ here)
    run_id = f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_dir.name)[:40]}-{secrets.token_hex(4)}"
    path.write_text(run_id + "\n")
    return run_id


class WandbSink:
    """A W&B run (``wandb.init``; WANDB_MODE=offline and WANDB_DIR apply), named after the run
    directory, with the run's resolved config; a --resume continues it (``resume="allow"``)."""

    def __init__(self, project: str, run_dir: str | Path, config: dict[str, Any], resuming: bool):
        import wandb

        from rhocli.core.errors import NotAvailableError

        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            # console="off": rank 0's progress bar stays on the terminal, not copied into the run
            self.run = wandb.init(project=project, dir=os.environ.get("WANDB_DIR") or str(run_dir),
                                  id=wandb_run_id(run_dir, resuming), name=run_dir.name, config=config,
                                  resume="allow", settings=wandb.Settings(console="off"))
        except wandb.errors.Error as err:  # not logged in, no network, ...: one line, not a traceback
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise NotAvailableError(f"--wandb-project {project}: W&B did not start: {first} "
                                    "(wandb login, or WANDB_MODE=offline)") from None
        # online, a resumed W&B run goes on after its last logged step and drops (with a warning)
        # any lower step: skip those here. Offline this is 0; the steps are reconciled on sync.
        self.first_step = self.run.starting_step

    def truncate_after(self, step: int) -> None:
        pass  # W&B keeps logged steps (see first_step)

    def append(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if step >= self.first_step:
            self.run.log(scalars(record), step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class RunMetrics:
    """The engine's metrics sink on rank 0: each record, with the step's ``tflops`` and ``mfu`` added,
    to metrics.jsonl and every optional sink; ``close`` after the run, however it ended."""

    def __init__(self, sinks: list, flops_per_token: int, devices: int, peak_tflops: float | None):
        self.sinks = sinks
        self.flops_per_token, self.devices, self.peak_tflops = flops_per_token, devices, peak_tflops

    def append(self, record: dict[str, Any]) -> None:
        if record.get("tokens_per_s") is not None:  # a training step (not the step-0 evaluation)
            record = {**record, **throughput(self.flops_per_token, record["tokens_per_s"], self.devices, self.peak_tflops)}
        for sink in self.sinks:
            sink.append(record)

    def truncate_after(self, step: int) -> None:
        for sink in self.sinks:
            sink.truncate_after(step)

    def close(self, failed: bool = False) -> None:
        """Every sink closes (flushes, wandb.finish) even when one of them fails; the first error is raised."""
        error = None
        for sink in self.sinks:
            try:
                if hasattr(sink, "close"):
                    sink.close(failed)
            except Exception as err:  # noqa: BLE001 - the others still close
                error = error or err
        if error is not None:
            raise error


def run_metrics(spec, devices: int, resuming: bool) -> RunMetrics:
    """Rank 0's sinks for ``spec``: metrics.jsonl always, TensorBoard and W&B when configured."""
    from parallel.model import flops_per_token
    from rhocli.core.formats.metrics import MetricsLog

    cfg = spec.train
    sinks: list = [MetricsLog(spec.run_dir)]
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(cfg.tensorboard))
    if cfg.wandb_project:
        sinks.append(WandbSink(cfg.wandb_project, spec.run_dir, spec.config_snapshot, resuming))
    return RunMetrics(sinks, flops_per_token(spec.model, spec.vocab_size, cfg.seq_length), devices,
                      default_peak_tflops(cfg.peak_tflops))
