"""rho analyze dynamics: the classifier on trajectories built with known categories, and on a real
run, whose fractions and per-category curves are recomputed here from the score stores with numpy's
own line fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rho_cli import run_rho
from train_utils import rho, write_tiny_config


def test_constructed_trajectories_fall_into_their_categories():
    from rhocli.analyze.dynamics import CATEGORIES, analyze, classify

    steps = np.array([0, 100, 200, 400])  # unevenly spaced: the fit is against the steps
    rng = np.random.default_rng(0)
    rows, truth = [], []
    for _ in range(50):
        rows.append(np.array([3.0, 2.5, 2.0, 1.0]) + rng.normal(0, 0.01, 4)); truth.append("H→L")  # learned
        rows.append(np.array([0.5, 0.9, 1.3, 2.1]) + rng.normal(0, 0.01, 4)); truth.append("L→H")  # unlearned
        rows.append(np.full(4, 0.3) + rng.normal(0, 0.03, 4)); truth.append("L→L")  # low, steady
        rows.append(np.full(4, 6.0) + rng.normal(0, 0.03, 4)); truth.append("H→H")  # high, steady
    losses = np.stack(rows)
    got = [CATEGORIES[c] for c in classify(losses, steps)]
    assert got == truth
    d = analyze(losses, list(steps))
    assert d.fractions == {"H→H": 0.25, "L→H": 0.25, "H→L": 0.25, "L→L": 0.25}
    assert np.allclose(d.mean_loss["H→L"], losses[0::4].mean(axis=0))
    # the steady high tokens wiggle more than the learned ones (their noise is larger)
    assert d.fluctuation["H→H"] > d.fluctuation["H→L"]


def test_the_threshold_is_on_the_fitted_change_over_the_run():
    from rhocli.analyze.dynamics import CATEGORIES, classify

    steps = np.array([10, 20, 30])
    # fitted changes of -0.3, -0.1, +0.1, +0.3 nats over the run; two flat tokens set the mean final loss
    losses = np.array([[2.15, 2.0, 1.85], [2.05, 2.0, 1.95], [1.95, 2.0, 2.05], [1.85, 2.0, 2.15],
                       [0.0, 0.0, 0.0], [4.0, 4.0, 4.0]])
    got = [CATEGORIES[c] for c in classify(losses, steps)]
    # the final losses' mean: (1.85 + 1.95 + 2.05 + 2.15 + 0 + 4) / 6 = 2.0
    assert got == ["H→L", "L→L", "H→H", "L→H", "L→L", "H→H"]
    with pytest.raises(ValueError):
        classify(losses[:, :1], steps[:1])


@pytest.mark.slow
def test_dynamics_of_a_real_run_recomputed_from_its_stores(tmp_path, tiny_data, capsys):  # noqa: C901
    config = write_tiny_config(tmp_path)
    run = tmp_path / "run"
    rho("train", config, "--data", tiny_data, "--save", run, "--steps", 6, "--save-interval", 2, "-q")
    out = tmp_path / "dyn"
    # a process of its own: each checkpoint is scored in it (a process group, the CPU shims)
    r = rho("analyze", "dynamics", run, "--data", tiny_data, "--output", out, "--sample", 600)
    assert "H→L" in r.stdout and "scored the sample with step 6 (3/3)" in r.stdout, r.stdout
    report = json.loads((out / "dynamics.json").read_text())
    assert report["steps"] == [2, 4, 6]
    fractions = [report[k] for k in ("H→H", "L→H", "H→L", "L→L")]
    assert sum(fractions) == pytest.approx(1.0) and report["tokens"] >= 600

    # recomputed here: the stores' losses, numpy's polyfit, the rule as docs/analysis.md states it
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    columns = []
    for step in (2, 4, 6):
        store = IndexedDataset(str(out / "scores" / f"step_{step:06d}"))
        columns.append(np.concatenate([np.array(store[i]) for i in range(len(store))]))
    losses = np.stack(columns, axis=1).astype(np.float64)
    slope = np.polyfit(np.array([2.0, 4.0, 6.0]), losses.T, 1)[0]
    change = slope * 4.0
    final = losses[:, -1]
    names = np.where(change < -0.2, "H→L", np.where(change > 0.2, "L→H", np.where(final <= final.mean(), "L→L", "H→H")))
    for name in ("H→H", "L→H", "H→L", "L→L"):
        members = names == name
        assert report[name] == pytest.approx(members.mean())
        if members.any():
            assert report["mean_loss"][name] == pytest.approx(losses[members].mean(axis=0).tolist(), abs=1e-5)
    html = (out / "dynamics.html").read_text()
    assert all(name in html for name in ("H→H", "L→H", "H→L", "L→L")) and "<svg" in html and "<script" not in html

    # what SLM would keep at each checkpoint against a reference (here the run's own step 2): the same
    # sample and stores, a top half of each document by excess computed here
    r = rho("analyze", "selection", run, "--data", tiny_data, "--reference", run / "step_000002", "--output", out,
            "--sample", 600, "--ratio", 0.5)
    assert "step 6: kept" in r.stdout, r.stdout
    sel = json.loads((out / "selection.json").read_text())
    ref_store, sample = IndexedDataset(str(out / "scores" / "reference")), IndexedDataset(str(out / "sample"))
    reference = np.concatenate([np.array(ref_store[i]) for i in range(len(ref_store))]).astype(np.float64)
    assert np.array_equal(reference, losses[:, 0])  # the reference is step 2: its scores are step 2's
    lengths = np.array(sample.sequence_lengths)  # a copy while the dataset (its mmap) is alive
    ends = np.concatenate([[0], np.cumsum(lengths)])
    for c in range(3):
        kept = np.zeros(len(losses), dtype=bool)
        excess = losses[:, c].astype(np.float32) - reference.astype(np.float32)
        for a, b in zip(ends[:-1], ends[1:]):
            k = int(np.floor(0.5 * (b - a) + 0.5))
            kept[a + np.argsort(-excess[a:b], kind="stable")[:k]] = True
        assert sel["kept_fraction"][c] == pytest.approx(kept.mean())
        assert sel["selected_loss"][c] == pytest.approx(losses[kept, c].mean(), abs=1e-5)
        assert sel["unselected_loss"][c] == pytest.approx(losses[~kept, c].mean(), abs=1e-5)
    assert sel["overlap_with_first"][0] == 1.0 and "Fig. 14" in (out / "selection.html").read_text()

    # a second call reuses the stores; without --force it keeps the report it made
    r = run_rho(capsys, "analyze", "dynamics", run, "--data", tiny_data, "--output", out, "--sample", 600)
    assert r.exit_code != 0 and "dynamics.json" in r.stderr and "--force" in r.stderr
    r = run_rho(capsys, "analyze", "dynamics", "--stores", out / "scores" / "step_000002", "--stores",
                out / "scores" / "step_000006", "--output", tmp_path / "two")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "two" / "dynamics.json").read_text())["steps"] == [2, 6]


def test_bad_input_is_one_line(tmp_path, tiny_data, capsys):
    (tmp_path / "empty_run").mkdir()
    r = run_rho(capsys, "analyze", "dynamics", tmp_path / "empty_run", "--data", tiny_data, "--output", tmp_path / "o")
    assert r.exit_code == 2 and "0 checkpoint(s)" in r.stderr and "--save-interval" in r.stderr
    r = run_rho(capsys, "analyze", "dynamics", tmp_path / "nope", "--data", tiny_data, "--output", tmp_path / "o")
    assert r.exit_code != 0 and "run directory not found" in r.stderr
    r = run_rho(capsys, "analyze", "dynamics", "--stores", tmp_path / "a", "--output", tmp_path / "o")
    assert r.exit_code == 2 and "at least two" in r.stderr
    assert all(len(x.strip().splitlines()) == 1 for x in [r.stderr])
