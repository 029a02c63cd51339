"""``rho bench train``'s paired comparison: the statistics against numpy and simulation, the
alternation, and real two-arm runs taking turns (``step_gate``): one must see a 4x difference in
work, one must name the arm that failed."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from rho_cli import run_rho
from rhocli.train.bench import abba_order, median_ci, paired_ratio_summary


def test_paired_summary_matches_numpy():
    rng = np.random.default_rng(0)
    a = [list(rng.lognormal(0, 0.1, size=12)) for _ in range(9)]
    b = [list(rng.lognormal(0.05, 0.1, size=12)) for _ in range(9)]
    s = paired_ratio_summary(a, b)
    ratios = np.median(np.array(b), axis=1) / np.median(np.array(a), axis=1)
    np.testing.assert_allclose(s.ratios, ratios, rtol=1e-12)
    assert s.median == pytest.approx(float(np.median(ratios)), rel=1e-12)
    assert (s.q1, s.q3) == pytest.approx(tuple(np.percentile(ratios, [25, 75])), rel=1e-12)
    # n = 9: P(X <= 1) = 10/512, so (x_(2), x_(8)) with coverage 1 - 20/512
    order = np.sort(ratios)
    assert (s.ci_low, s.ci_high) == (order[1], order[7])
    assert s.ci_coverage == pytest.approx(1 - 20 / 512)


@pytest.mark.parametrize("n", [6, 9, 15])
def test_median_ci_covers_the_true_median_as_often_as_it_says(n):
    # skewed noise, as a shared machine's step times are: the interval must not assume symmetry
    rng = np.random.default_rng(n)
    true_median = math.exp(0.3)  # lognormal(0.3, 0.5)
    trials, covered, stated = 4000, 0, None
    for _ in range(trials):
        low, high, stated = median_ci(list(rng.lognormal(0.3, 0.5, size=n)))
        covered += low <= true_median <= high
    assert stated >= 0.95
    assert abs(covered / trials - stated) < 0.015, (covered / trials, stated)


def test_median_ci_needs_six_values():
    assert median_ci([1.0, 1.1, 0.9, 1.2, 1.05]) == (None, None, None)


def _simulated_bench(rng, cost_b=1.03, rounds=12, steps=18, paired=True):
    """Step times on a machine whose speed wanders by +-30 % between rounds, +-2 % between the two
    arms' runs of a round and 5 % (lognormal) between steps; arm B costs ``cost_b`` x arm A.
    Unpaired, the arms' runs are far apart in time: each sees its own machine speed."""
    a_rounds, b_rounds = [], []
    for _ in range(rounds):
        speed = rng.uniform(0.7, 1.3)
        for arm_rounds, cost in ((a_rounds, 1.0), (b_rounds, cost_b)):
            speed = speed if paired else rng.uniform(0.7, 1.3)
            arm_rounds.append(list(cost * speed * rng.uniform(0.98, 1.02) * rng.lognormal(0, 0.05, size=steps)))
    return a_rounds, b_rounds


def test_pairing_resolves_three_percent_under_drift():
    """Over 300 simulated benches: the paired interval holds the true 1.03 as often as it claims and
    excludes 1 in most of them, while the old report (one run per arm, one after the other, ratio of
    their medians) scatters several times wider and often gets the sign wrong."""
    rng = np.random.default_rng(7)
    holds = resolved = 0
    paired, unpaired = [], []
    for _ in range(300):
        a, b = _simulated_bench(rng)
        s = paired_ratio_summary(a, b)
        holds += s.ci_low <= 1.03 <= s.ci_high
        resolved += s.ci_low > 1.0
        paired.append(s.median)
        one_a, one_b = _simulated_bench(rng, rounds=1, steps=8, paired=False)
        unpaired.append(statistics.median(one_b[0]) / statistics.median(one_a[0]))
    assert holds / 300 >= s.ci_coverage - 0.03
    assert resolved / 300 > 0.7
    assert np.std(unpaired) > 3 * np.std(paired)
    assert np.mean(np.array(unpaired) < 1) > 0.2


def test_abba_order_alternates_which_arm_runs_first():
    assert [abba_order(r, 2) for r in range(4)] == [[0, 1], [1, 0], [0, 1], [1, 0]]
    assert abba_order(3, 1) == [0]


def test_vs_source_that_is_not_rho_is_refused(capsys, tmp_path):
    r = run_rho(capsys, "bench", "train", "configs/tiny.yaml", "--vs-source", tmp_path)
    assert r.exit_code != 0 and "--vs-source" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_an_arm_that_fails_is_named_and_its_partner_stopped(capsys):
    """Arm B cannot start (a sequence longer than the model's positions): the bench says which arm and why, in
    one line, while arm A is left waiting at its gate; the autouse fixture checks none outlives it."""
    r = run_rho(capsys, "bench", "train", "configs/tiny.yaml", "--steps", "3", "--warmup", "1", "--rounds", "1",
                "--set", "model.vocab_size=512", "--vs-set", "train.seq_length=1024")
    assert r.exit_code != 0
    assert "'B: train.seq_length=1024' failed" in r.stderr, r.stderr
    assert "seq_length 1024 exceeds the model's max_position_embeddings 512" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_sees_four_times_the_work(capsys):
    """Arm B trains 4x the tokens per step (global batch 32 vs 8): the paired ratio must find B slower
    (by how much is the bench's to measure, not a test's: a busy CI machine read +30 .. +160 %), and
    the table must carry each arm's own tokens per step."""
    r = run_rho(capsys, "bench", "train", "configs/tiny.yaml", "--steps", "4", "--warmup", "1", "--rounds", "2",
                "--set", "model.vocab_size=512", "--vs-set", "train.global_batch_size=32")
    assert r.exit_code == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "1,024" in text and "4,096" in text  # tokens / step of A and B
    pct = float(text.split("B / A step time: ")[1].split(" %")[0])
    assert pct > 0, text
    assert "2 rounds x 3 steps, taking turns step by step" in text


def test_the_step_gate_takes_turns_and_a_gated_rank_stops_when_the_bench_is_gone(tmp_path):
    """The gate's protocol through real FIFOs: a gated rank reports ready, waits for its turn, reports
    each step; when the bench closes its ends (it ended), the rank's next wait is a one-line
    WorkerError, not a hang or an internal error."""
    import threading

    from rhocli.core.errors import WorkerError
    from rhocli.train.step_gate import GateKeeper, RankGate, make_gate

    gate = make_gate(tmp_path / "gate")
    keeper = GateKeeper([gate], [lambda: True])
    rank = RankGate(gate, last_step=3)
    events, outcome = [], []

    def trainer():  # what the Trainer does: "start", then a "step" event after each step
        on_event = rank.wrap(lambda kind, payload: events.append(kind))
        try:
            on_event("start", None)
            for step in (1, 2, 3):
                on_event("step", {"step": step})
        except WorkerError as err:
            outcome.append(err)

    thread = threading.Thread(target=trainer)
    thread.start()
    keeper.wait_ready()
    keeper.step(0)
    assert events == ["start", "step"]  # one turn, one step
    keeper.close()  # the bench is gone: the rank waiting for its second turn stops
    thread.join(timeout=10)
    assert not thread.is_alive() and events == ["start", "step"]
    assert len(outcome) == 1 and "step gate closed" in str(outcome[0])
