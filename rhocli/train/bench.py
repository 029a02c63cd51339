"""``rho bench train``: step time, tokens/s and an MFU estimate for a model config and layout.

Runs the real ``rho train`` (a subprocess, the same launcher and engine) on a synthetic token
dataset of random ids, without checkpoints, and reads per-step times from its metrics.jsonl. The
first ``warmup`` steps (allocation, compilation of the schedule's buffers) are left out.

A comparison (two ``Arm``s: selective vs plain, a --set, or another rho checkout) is paired: each
round runs both arms back to back, in ABBA order, and contributes one ratio of the arms' median step
times; the report is the median of those ratios with its quartiles and a distribution-free confidence
interval. On a shared machine the speed drifts by more than the differences worth measuring (three
unpaired runs of --select-ratio 0.6 read +7.6 %, -3.3 % and -14.8 %); within a round both arms see
about the same machine, so the drift cancels in the ratio.

FLOPs per token follow Megatron-LM / PaLM accounting: 6·N for the dense weights (forward + backward)
plus 12·layers·hidden·seq for attention scores (``parallel.model.flops_per_token``, which every training
step's ``tflops``/``mfu`` in metrics.jsonl uses too). MFU is reported against ``peak_tflops`` per device
(default: 989 for H100/H200 bf16 dense when CUDA is present; none on CPU unless given).
"""

from __future__ import annotations

import dataclasses
import json
import math
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
from rhocli.train.step_gate import GATE_ENV, ArmExited, GateKeeper, make_gate, wait_all


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
    arm: str = "plain"
    peak_memory_bytes: int | None = None
    """Rank 0's peak (CUDA allocator on a GPU, resident set on the CPU), the largest of the arm's runs."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One side of a comparison: the run's --set overrides, and the rho source tree that runs it
    (None: this one; a directory: another checkout, e.g. a ``git worktree`` of an older commit, put
    first on PYTHONPATH to check that the plain step has not regressed)."""
    label: str
    sets: tuple[str, ...] = ()
    source: Path | None = None
    select_ratio: float | None = None
    """Train selectively, keeping this fraction of tokens, on synthetic reference losses."""
    reference_online: bool = False
    """With ``select_ratio``: the reference losses from a reference model run online (``--reference``:
    the trained model's shape, random weights) instead of a score store."""


@dataclasses.dataclass
class PairedSummary:
    """Arm B's step time over arm A's, one ratio per round (each round runs both arms, in ABBA
    order): the median ratio, its quartiles, and a distribution-free confidence interval for it."""
    ratios: list[float]
    median: float
    q1: float
    q3: float
    ci_low: float | None
    ci_high: float | None
    ci_coverage: float | None
    """The interval's exact coverage (order statistics of the ratios; None: too few rounds)."""


@dataclasses.dataclass
class TrainBenchResult:
    reports: list[TrainBenchReport]
    """One per arm, from all its rounds' step times (median)."""
    comparison: PairedSummary | None
    rounds: int


def median_ci(values: list[float], level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """Distribution-free confidence interval for the median: the order statistics (x_(k), x_(n+1-k))
    with the largest k whose exact coverage 1 - 2·P(Binomial(n, 1/2) < k) is still >= ``level``.
    Needs no assumption on the ratios' distribution (a shared machine's timing noise is skewed);
    (None, None, None) below 6 values, where even (min, max) covers less than 95 %."""
    xs = sorted(values)
    n = len(xs)
    best = None
    for k in range(1, n // 2 + 1):
        tail = sum(math.comb(n, i) for i in range(k)) / 2 ** n  # P(X < k), X ~ Binomial(n, 1/2)
        coverage = 1 - 2 * tail
        if coverage < level:
            break
        best = (xs[k - 1], xs[n - k], coverage)
    return best if best is not None else (None, None, None)


def paired_ratio_summary(a_rounds: list[list[float]], b_rounds: list[list[float]], level: float = 0.95) -> PairedSummary:
    """Per round, median(B's step times) / median(A's step times); then the median of those ratios,
    their quartiles and ``median_ci``. A round pairs the two arms in time, so a machine that slows
    down for a while (another job, thermal limits) slows both sides of that round's ratio."""
    if len(a_rounds) != len(b_rounds) or not a_rounds:
        raise ValueError("paired_ratio_summary needs the same number (> 0) of rounds for both arms")
    ratios = [statistics.median(b) / statistics.median(a) for a, b in zip(a_rounds, b_rounds)]
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    low, high, coverage = median_ci(ratios, level)
    return PairedSummary(ratios=ratios, median=statistics.median(ratios), q1=q1, q3=q3,
                         ci_low=low, ci_high=high, ci_coverage=coverage)


def abba_order(round_index: int, arms: int) -> list[int]:
    """Which arm runs first in a round: A B, then B A, ... so neither arm is always the one that
    runs right after the other's (page cache, CPU frequency, a neighbour's job starting)."""
    order = list(range(arms))
    return order if round_index % 2 == 0 else order[::-1]


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


def write_reference_checkpoint(config: Path, workdir: Path, extra: list[str]) -> Path:
    """A reference model for the online arm: the config's model after one step on the synthetic data
    (random weights of the trained model's shape, the synthetic tokenizer's vocabulary)."""
    run_dir = workdir / "reference"
    cmd = [sys.executable, "-m", "rhocli", "train", str(config), "--data", str(workdir / "synthetic"), "--save",
           str(run_dir), "--steps", "1", "--eval-interval", "0", "--set", "train.warmup_steps=0",
           "--set", "train.split=100,0,0", "-q", *[a for item in extra for a in ("--set", item)]]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        raise WorkerError(f"benchmark reference model (one training step) failed: {lines[-1]}")
    return run_dir


def run_bench_train(config: Path, tp: int, pp: int, dp: int, steps: int, warmup: int,
                    extra: list[str], peak_tflops: float | None, arms: list[Arm] | None = None,
                    rounds: int = 1, alternate: str = "step") -> TrainBenchResult:
    """Time ``rho train`` on one synthetic dataset, for one arm or two compared.

    Two arms are compared over ``rounds`` rounds, each a fresh run of each arm, and each round gives
    one ratio of the arms' median step times. ``alternate="step"``: a round's two runs start at once
    and take turns step by step (``step_gate``), so both see the same machine from second to second;
    ``"run"``: they run one after the other, in ABBA order over the rounds (for models of which two
    copies do not fit in memory at once, or another checkout's rho, which cannot take turns).

    A fresh pair of processes every round, because a process has its own speed: two identical arms
    taking turns step by step differed by a steady -10 .. +8 % from one pair of processes to the
    next (2 cores, tiny.yaml; Python's hash seed is not the cause: a shared or fixed one changed
    nothing), while within one pair the ratio held to about 1 %. Rounds average that out."""
    import torch

    from parallel.model import count_parameters, flops_per_token
    from rhocli.train.spec import load_run_configs

    arms = arms or [Arm("plain")]
    # each arm's own configs: a --vs-set may change the batch, the sequence or the model
    configs = [load_run_configs(config, {}, [*extra, *arm.sets]) for arm in arms]
    vocab = max(m.vocab_size or 32000 for m, _ in configs)
    tokens_needed = max(t.global_batch_size * (t.seq_length + 1) for _, t in configs) * (steps + 2) * 2
    workdir = Path(tempfile.mkdtemp(prefix="rho-bench-train-"))
    try:
        write_synthetic_dataset(workdir / "synthetic", vocab, tokens_needed)
        if any(arm.select_ratio is not None and not arm.reference_online for arm in arms):
            write_synthetic_scores(workdir / "synthetic", workdir / "synthetic.ref")
        if any(arm.reference_online for arm in arms):
            write_reference_checkpoint(config, workdir, extra)
        runs = [_ArmRun(workdir, a, arm, config, (tp, pp, dp), steps, extra) for a, arm in enumerate(arms)]
        times: list[list[list[float]]] = [[] for _ in arms]  # [arm][round] -> step times of that run
        peaks: list[int | None] = [None for _ in arms]
        for r in range(rounds):
            if len(arms) == 2 and alternate == "step":
                arm_times = _alternate_steps(runs, steps, warmup, first=abba_order(r, 2)[0])
                for a, t in enumerate(arm_times):
                    times[a].append(t)
            else:
                for a in abba_order(r, len(arms)):
                    times[a].append(runs[a].run(warmup))
            for a, run in enumerate(runs):
                peak = run.peak_memory()
                peaks[a] = peak if peaks[a] is None or (peak or 0) > peaks[a] else peaks[a]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    devices = tp * pp * dp
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    reports = []
    for arm, arm_times, peak_memory, (model_cfg, train_cfg) in zip(arms, times, peaks, configs):
        arm_vocab = model_cfg.vocab_size or vocab
        seq, tokens_per_step = train_cfg.seq_length, train_cfg.global_batch_size * train_cfg.seq_length
        pooled = [t for round_times in arm_times for t in round_times]
        step_time = statistics.median(pooled)
        tokens_per_s = tokens_per_step / step_time
        peak = default_peak_tflops(peak_tflops if peak_tflops is not None else train_cfg.peak_tflops)
        rate = throughput(flops_per_token(model_cfg, arm_vocab, seq), tokens_per_s, devices, peak)
        reports.append(TrainBenchReport(
            config=str(config), layout=f"tp{tp} pp{pp} dp{dp}", device=device,
            parameters=count_parameters(model_cfg, arm_vocab), tokens_per_step=tokens_per_step,
            step_time_s=step_time, tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / devices,
            tflops_per_device=rate["tflops"], mfu=rate["mfu"], steps_measured=len(pooled), arm=arm.label,
            peak_memory_bytes=peak_memory))
    comparison = paired_ratio_summary(times[0], times[1]) if len(arms) == 2 else None
    return TrainBenchResult(reports=reports, comparison=comparison, rounds=len(times[0]))


class _ArmRun:
    """The ``rho train`` command line of one arm (its own run directory, its overrides, its rho)."""

    def __init__(self, workdir: Path, index: int, arm: Arm, config: Path, layout: tuple[int, int, int],
                 steps: int, extra: list[str]):
        tp, pp, dp = layout
        self.arm, self.run_dir = arm, workdir / f"run{index}"
        self.gate_dir = workdir / f"gate{index}"
        self.stderr_path = workdir / f"stderr{index}.txt"
        # no validation split: the bench never evaluates, and megatron's builder has nothing to gain
        # from carving one out of a small synthetic set
        self.cmd = [sys.executable, "-m", "rhocli", "train", str(config), "--data", str(workdir / "synthetic"),
                    "--save", str(self.run_dir), "--steps", str(steps), "--tp", str(tp), "--pp", str(pp), "--dp", str(dp),
                    "--eval-interval", "0", "--set", "train.checkpoint=false", "--set", "train.warmup_steps=1",
                    "--set", "train.split=100,0,0", "-q"]
        sets = [*extra, *arm.sets]
        if arm.select_ratio is not None and arm.reference_online:
            sets += [f"train.reference={workdir / 'reference'}", f"train.select_ratio={arm.select_ratio}"]
        elif arm.select_ratio is not None:
            sets += [f"train.scores=[{workdir / 'synthetic.ref'}]", f"train.select_ratio={arm.select_ratio}"]
        for item in sets:
            self.cmd += ["--set", item]
        self.env = dict(os.environ)
        self.env.pop(GATE_ENV, None)
        if arm.source is not None:  # another checkout's packages shadow the installed rho
            self.env["PYTHONPATH"] = os.pathsep.join([str(arm.source), *filter(None, [self.env.get("PYTHONPATH")])])

    def start(self, gated: bool) -> subprocess.Popen:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.gate_dir, ignore_errors=True)
        env = {**self.env, GATE_ENV: str(make_gate(self.gate_dir))} if gated else self.env
        with open(self.stderr_path, "w") as err:
            return subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)

    def run(self, warmup: int) -> list[float]:
        """One ungated run; its step times after ``warmup``."""
        proc = self.start(gated=False)
        if proc.wait() != 0:
            raise self.failure()
        return self.step_times(warmup)

    def failure(self) -> WorkerError:
        lines = self.stderr_path.read_text(errors="replace").strip().splitlines() or ["(no output)"]
        where = f" (rho at {self.arm.source})" if self.arm.source is not None else ""
        return WorkerError(f"benchmark training run {self.arm.label!r} failed{where}: {lines[-1]}")

    def peak_memory(self) -> int | None:
        """Rank 0's peak memory over the run (its last step's record), if recorded."""
        from rhocli.core.formats.metrics import MetricsLog

        records = [json.loads(l) for l in MetricsLog(self.run_dir).path.read_text().splitlines() if l.strip()]
        values = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes")]
        return max(values) if values else None

    def step_times(self, warmup: int) -> list[float]:
        from rhocli.core.formats.metrics import MetricsLog

        records = [json.loads(l) for l in MetricsLog(self.run_dir).path.read_text().splitlines() if l.strip()]
        times = [r["step_time_s"] for r in records if "step_time_s" in r and r["step"] > warmup]
        if not times:
            raise WorkerError(f"no steps after the {warmup} warm-up steps; raise --steps")
        return times


def _alternate_steps(runs: list[_ArmRun], steps: int, warmup: int, first: int) -> list[list[float]]:
    """Both runs at once, taking turns step by step (``first`` starts: A B B A A B ... or B A A B ...);
    each arm's step times after ``warmup``."""
    procs = [run.start(gated=True) for run in runs]
    keeper = GateKeeper([run.gate_dir for run in runs], [lambda p=p: p.poll() is None for p in procs])
    try:
        keeper.wait_ready()  # both started up (imports, model, data) before the first timed step
        for pair in range(steps):
            for a in abba_order(pair + first, len(runs)):
                keeper.step(a)
        wait_all(procs)
    except ArmExited as exited:
        procs[exited.arm].wait()
        raise runs[exited.arm].failure() from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        keeper.close()
    for run, proc in zip(runs, procs):
        if proc.returncode != 0:
            raise run.failure()
    return [run.step_times(warmup) for run in runs]
