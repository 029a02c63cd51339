"""rho train --tensorboard DIR --wandb-project NAME: every scalar of metrics.jsonl reaches TensorBoard
and W&B under the same name and step, read back with TensorBoard's own EventAccumulator and with
wandb's own record schema (wandb.proto) from the offline run's .wandb file; the TFLOP/s and MFU
fields against a hand computation; a missing package is one line before any rank starts."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

from rho_cli import run_rho
from train_utils import model_tensors, rho, write_tiny_config

pytestmark = pytest.mark.slow

PEAK = 0.02  # TFLOP/s: a made-up peak, so that the CPU run has an MFU to check


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, tiny_data) -> Path:
    """3 steps, validation at steps 0, 2 and 3, logged to TensorBoard and to an offline W&B run."""
    d = tmp_path_factory.mktemp("watched")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(d / "wandb_dir"), "WANDB_SILENT": "true"}
    (d / "wandb_dir").mkdir()
    rho("train", write_tiny_config(d), "--data", tiny_data, "--save", d / "run", "--eval-interval", 2,
        "--tensorboard", d / "tb", "--wandb-project", "rho-test", "--set", f"train.peak_tflops={PEAK}", "-q",
        env_extra=env)
    return d


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tag -> {step: value}: every number but the step itself (null and text left out)."""
    out: dict[str, dict[int, float]] = {}
    for r in _records(run):
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, {})[r["step"]] = float(v)
    return out


def test_tensorboard_holds_every_metric(watched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = _expected_scalars(watched_run / "run")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "valid_loss", "tflops", "mfu"} <= set(expected)
    acc = EventAccumulator(str(watched_run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        # TensorBoard's scalar summaries are float32
        assert got == {step: float(struct.unpack("f", struct.pack("f", v))[0]) for step, v in values.items()}, tag
    assert sorted(expected["valid_loss"]) == [0, 2, 3]


def _wandb_records(path: Path):
    """The records of a .wandb file: wandb's LevelDB-log framing (a 7-byte ':W&B' header, 32 KiB
    blocks of chunks with a CRC-32, length and type, FULL/FIRST/MIDDLE/LAST), each record decoded with
    wandb's own protobuf schema. wandb 0.31 ships no Python reader of its own (wandb-core reads it)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, "corrupt chunk"
        pos += 7 + length
        parts += chunk
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_run_holds_every_metric(watched_run):
    run = watched_run / "run"
    files = list((watched_run / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = list(_wandb_records(files[0]))
    run_records = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_records and run_records[0].display_name == "run" and run_records[0].project == "rho-test"
    assert run_records[0].run_id == (run / "wandb-run-id").read_text().strip()
    config = {item.key: json.loads(item.value_json) for item in run_records[0].config.update}
    assert config["train"]["steps"] == 3 and config["model"]["hidden_size"] == 64  # the resolved config
    got: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    got.setdefault(key, {})[r.history.step.num] = float(json.loads(item.value_json))
    assert got == _expected_scalars(run)  # exact: JSON doubles on both sides


def test_tflops_and_mfu_follow_the_flops_formula(watched_run):
    """tflops = (6·params + 12·layers·hidden·seq) · tokens/s / devices / 1e12, mfu = tflops / peak;
    the parameter count checked against the checkpoint's own tensors (less the vocabulary padding)."""
    import yaml

    from parallel.config import ModelConfig
    from parallel.model import count_parameters

    run = watched_run / "run"
    manifest = json.loads((run / "step_000003" / "rho_checkpoint.json").read_text())
    model = ModelConfig(**{k: v for k, v in manifest["model"].items() if k in ModelConfig.__dataclass_fields__})
    vocab, padded = manifest["vocab_size"], manifest["padded_vocab_size"]
    params = count_parameters(model, vocab)
    tensors = model_tensors(run / "step_000003")
    assert sum(t.numel() for t in tensors.values()) - 2 * (padded - vocab) * model.hidden_size == params
    seq = yaml.safe_load((run / "train.config.yaml").read_text())["train"]["seq_length"]
    per_token = 6 * params + 12 * model.num_layers * model.hidden_size * seq
    steps = [r for r in _records(run) if "tokens_per_s" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["tflops"] == pytest.approx(per_token * r["tokens_per_s"] / 1 / 1e12, rel=1e-12)
        assert r["mfu"] == pytest.approx(r["tflops"] / PEAK, rel=1e-12)
    assert "tflops" not in _records(run)[0]  # the step-0 evaluation trains no token


def test_mfu_is_null_without_a_peak(tmp_path):
    import torch

    from rhocli.core.formats.metrics import MetricsLog
    from rhocli.train.sinks import RunMetrics, default_peak_tflops

    if torch.cuda.is_available():
        pytest.skip("with CUDA the H100 peak is the default")
    assert default_peak_tflops(None) is None
    metrics = RunMetrics([MetricsLog(tmp_path)], flops_per_token=1000, devices=4, peak_tflops=None)
    metrics.append({"step": 1, "loss": 2.0, "tokens_per_s": 8e9})
    (record,) = _records(tmp_path)
    assert record["tflops"] == 1000 * 8e9 / 4 / 1e12 and record["mfu"] is None


def test_tensorboard_resume_hides_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    """Steps 1-5 logged, checkpoint at 2, resumed: TensorBoard shows 1-2 from the first writer and 3-4
    from the resumed one; 5, never re-logged, is gone (SummaryWriter's purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rhocli.train.sinks import TensorBoardSink

    first = TensorBoardSink(tmp_path)
    for step in range(1, 6):
        first.append({"step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardSink(tmp_path)
    resumed.truncate_after(2)
    for step in (3, 4):
        resumed.append({"step": step, "loss": 10.0 * step})
    resumed.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("loss")} == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}


def test_wandb_resume_continues_the_run_of_the_run_directory(tmp_path, monkeypatch):
    """A fresh start writes a new W&B id, --resume reuses it, a fresh start (--force) gets another."""
    import wandb

    from rhocli.train.sinks import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    ids = []
    for resuming in (False, True, False):
        sink = WandbSink("rho-test", tmp_path / "run", {"train": {}}, resuming)
        sink.append({"step": 1, "loss": 1.0})
        sink.close()
        ids.append(sink.run.id)
    wandb.teardown()  # the service wandb started for this process, not left to its atexit hook
    assert ids[0] == ids[1] != ids[2]
    # WANDB_DIR unset: in the run directory, one offline run (a .wandb file named by its id) per start
    files = [p.name for p in (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")]
    assert sorted(files) == sorted([f"run-{ids[0]}.wandb"] * 2 + [f"run-{ids[2]}.wandb"])


@pytest.mark.parametrize("flag, package", [("--tensorboard", "tensorboard"), ("--wandb-project", "wandb")])
def test_missing_package_is_one_line_before_any_rank(capsys, tmp_path, tiny_data, monkeypatch, flag, package):
    monkeypatch.setitem(sys.modules, package, None)  # import (and find_spec) now fail as if not installed
    r = run_rho(capsys, "train", write_tiny_config(tmp_path), "--data", tiny_data, "--save", tmp_path / "run",
                flag, "x", "-q")
    assert r.exit_code == 7, r
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert f"{flag} needs the {package} package: pip install 'rho[{package}]'" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing prepared, no rank started


def test_bad_wandb_project_name_is_a_usage_error(capsys, tmp_path, tiny_data):
    r = run_rho(capsys, "train", write_tiny_config(tmp_path), "--data", tiny_data, "--save", tmp_path / "run",
                "--wandb-project", "a/b", "--dry-run")
    assert r.exit_code == 2 and "a W&B project name cannot contain" in r.stderr
