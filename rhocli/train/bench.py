"""``rho bench train``: step time, tokens/s and an MFU estimate for a model config and layout.

Runs the real ``rho train`` (a subprocess, the same launcher and engine) on a synthetic token
dataset of random ids, without checkpoints, and reads per-step times from its metrics.jsonl. The
first ``warmup`` steps (allocation, compilation of the schedule's buffers) are left out.

FLOPs per token follow Megatron-LM / PaLM accounting: 6·N for the dense weights (forward + backward)
plus 12·layers·hidden·seq for attention scores (``parallel.model.flops_per_token``, which every training
step's ``tflops``/``mfu`` in metrics.jsonl uses too). MFU is reported against ``peak_tflops`` per device
(default: 989 for H100/H200 bf16 dense when CUDA is present; none on CPU unless given).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from rhocli.core.errors import WorkerError
from rhocli.train.sinks import default_peak_tflops, throughput


@dataclasses.dataclass
class TrainBenchReport:
    config: str
    layout: str
    device: str
    parameters: int
    tokens_per_step: int
    step_time_s: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    tflops_per_device: float
    mfu: float | None
    steps_measured: int



def write_synthetic_dataset(prefix: Path, vocab_size: int, tokens: int, seed: int = 0) -> None:
    """Random-id documents (lengths 64..2048) as a rho token dataset with a manifest."""
    from rhocli.core.formats.tokens import TOKENS, TokenDatasetWriter, optimal_token_dtype

    rng = np.random.default_rng(seed)
    dtype = optimal_token_dtype(vocab_size)
    writer = TokenDatasetWriter(str(prefix) + ".bin", dtype)
    written, docs = 0, 0
    while written < tokens:
        n = int(rng.integers(64, 2048))
        doc = rng.integers(3, vocab_size, size=n).astype(dtype)
        doc[-1] = 2
        writer.add_documents(doc, [n])
        written += n
        docs += 1
    fingerprint = writer.finalize(str(prefix) + ".idx")
    TOKENS.write(str(prefix) + ".json", {
        "created_by": "rho bench train (synthetic)",
        "fingerprint": fingerprint,
        "tokenizer": {"kind": "synthetic", "path": None, "fingerprint": f"synthetic-{vocab_size}", "vocab_size": vocab_size,
                      "bos_id": 1, "eos_id": 2, "eod_id": 2, "pad_id": None},
        "dtype": dtype, "documents": docs, "tokens": written, "sequences_per_document": 1, "sources": [], "options": {},
    })


def write_synthetic_scores(token_prefix: Path, prefix: Path, seed: int = 1) -> None:
    """Random reference losses aligned with a token dataset (for the SLM overhead benchmark)."""
    from rhocli.core.formats.scores import ScoreStoreWriter
    from rhocli.core.formats.tokens import TokenDataset

    rng = np.random.default_rng(seed)
    tokens = TokenDataset(token_prefix)
    lengths = tokens.document_lengths()
    writer = ScoreStoreWriter(prefix, {"window": None, "token_dataset": {"prefix": str(token_prefix), "fingerprint": tokens.fingerprint()},
                                       "reference_model": "synthetic (rho bench train)"})
    writer.prepare()
    writer.write_shard(0, {d: rng.random(int(n), dtype=np.float32) * 8 for d, n in enumerate(lengths)})
    writer.publish(1, lengths)


def run_bench_train(config: Path, tp: int, pp: int, dp: int, steps: int, warmup: int,
                    extra: list[str], peak_tflops: float | None, select_ratio: float | None = None) -> TrainBenchReport:
    import torch

    from parallel.model import count_parameters, flops_per_token
    from rhocli.core.formats.metrics import MetricsLog
    from rhocli.train.spec import load_run_configs

    model_cfg, train_cfg = load_run_configs(config, {}, [s for s in extra])
    vocab = model_cfg.vocab_size or 32000
    gbs, seq = train_cfg.global_batch_size, train_cfg.seq_length
    workdir = Path(tempfile.mkdtemp(prefix="rho-bench-train-"))
    try:
        write_synthetic_dataset(workdir / "synthetic", vocab, (steps + 2) * gbs * (seq + 1) * 2)
        if select_ratio is not None:
            write_synthetic_scores(workdir / "synthetic", workdir / "synthetic.ref")
            extra = [*extra, "train.scores=[" + str(workdir / "synthetic.ref") + "]", f"train.select_ratio={select_ratio}"]
        cmd = [sys.executable, "-m", "rhocli", "train", str(config), "--data", str(workdir / "synthetic"),
               "--save", str(workdir / "run"), "--steps", str(steps), "--tp", str(tp), "--pp", str(pp), "--dp", str(dp),
               "--eval-interval", "0", "--set", "train.checkpoint=false", "--set", "train.warmup_steps=1", "-q"]
        for item in extra:
            cmd += ["--set", item]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise WorkerError(f"benchmark training run failed: {tail}")
        records = [json.loads(l) for l in MetricsLog(workdir / "run").path.read_text().splitlines() if l.strip()]
        times = [r["step_time_s"] for r in records if "step_time_s" in r and r["step"] > warmup]
        if not times:
            raise WorkerError(f"no steps after the {warmup} warm-up steps; raise --steps")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    step_time = statistics.median(times)
    devices = tp * pp * dp
    tokens_per_step = gbs * seq
    tokens_per_s = tokens_per_step / step_time
    params = count_parameters(model_cfg, vocab)
    peak = default_peak_tflops(peak_tflops if peak_tflops is not None else train_cfg.peak_tflops)
    rate = throughput(flops_per_token(model_cfg, vocab, seq), tokens_per_s, devices, peak)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return TrainBenchReport(
        config=str(config), layout=f"tp{tp} pp{pp} dp{dp}", device=device, parameters=params,
        tokens_per_step=tokens_per_step, step_time_s=step_time, tokens_per_s=tokens_per_s,
        tokens_per_s_per_device=tokens_per_s / devices, tflops_per_device=rate["tflops"],
        mfu=rate["mfu"], steps_measured=len(times),
    )
