"""Selective training's score functions (excess, reference, training, entropy, random and two of them
combined), online (``parallel.loss.Selection``) and offline (``rho select``), each against a top-k
written here from the functions' definitions; the kept-fraction schedule; the random control's draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rho_cli import run_rho
from store_utils import write_score_store

SCORES = ["excess", "reference", "training", "entropy", "random", "reference&entropy", "training|random",
          "excess&random"]


def _definition(name: str, t: dict[str, np.ndarray]) -> np.ndarray:
    """What each function ranks by (higher kept first), from docs/selective.md's table."""
    return {"excess": t["loss"] - t["ref"], "reference": -t["ref"], "training": t["loss"],
            "entropy": -t["entropy"], "random": t["random"]}[name]


def _expected(score: str, t: dict[str, np.ndarray], candidate: np.ndarray, ratio: float) -> np.ndarray:
    """Per row: the candidates with the k largest values, k = floor(ratio * candidates + 0.5); then
    the intersection (&) or union (|) of two functions' choices."""
    op = "&" if "&" in score else "|" if "|" in score else None
    chosen = []
    for name in (score.split(op) if op else [score]):
        values = _definition(name, t)
        keep = np.zeros_like(candidate)
        for row in range(values.shape[0]):
            idx = np.flatnonzero(candidate[row])
            k = int(np.floor(ratio * idx.size + 0.5))
            keep[row, idx[np.argsort(-values[row, idx], kind="stable")[:k]]] = True
        chosen.append(keep)
    return chosen[0] if op is None else (chosen[0] & chosen[1] if op == "&" else chosen[0] | chosen[1])


def _micro_batch(seed: int = 0, b: int = 3, s: int = 40) -> dict[str, np.ndarray]:
    """Distinct values on the 1/1024 grid (exact in fp32, unchanged by the selection's rounding), so
    the top-k has no ties and the expected set is unambiguous."""
    rng = np.random.default_rng(seed)
    grid = lambda: (rng.permutation(b * s).reshape(b, s) / 1024.0 * 7).astype(np.float32)
    ref = grid()
    excess = grid()
    t = {"ref": ref, "loss": ref + excess, "entropy": grid(), "random": rng.random((b, s)).astype(np.float32)}
    t["loss"] = (np.round(t["loss"] * 1024) / 1024).astype(np.float32)
    t["candidate"] = rng.random((b, s)) > 0.2
    return t


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("ratio", [0.4, 0.75])
def test_online_selection_is_the_top_k_of_its_score(score, ratio):
    from parallel.loss import Selection

    t = _micro_batch()
    inputs = {"ref_loss": torch.from_numpy(t["ref"]), "ref_entropy": torch.from_numpy(t["entropy"]),
              "random": torch.from_numpy(t["random"])}
    kept = Selection(ratio=ratio, scope="sequence", score=score).kept(
        torch.from_numpy(t["loss"]), inputs, torch.from_numpy(t["candidate"].astype(np.float32)))
    expected = _expected(score, t, t["candidate"], ratio)
    assert np.array_equal(kept.numpy(), expected)
    assert not (kept.numpy() & ~t["candidate"]).any()


def test_schedule_warm_up_then_linear():
    from parallel.loss import Selection

    sel = Selection(ratio=0.5, ratio_start=0.9, select_after=2, steps=7)
    assert [round(sel.ratio_of(s), 6) for s in range(7)] == [1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert [Selection(ratio=0.6, select_after=1, steps=3).ratio_of(s) for s in range(3)] == [1.0, 0.6, 0.6]
    # during the warm-up every candidate is kept, whatever the score
    t = _micro_batch()
    sel.set_step(1)
    kept = sel.kept(torch.from_numpy(t["loss"]), {"ref_loss": torch.from_numpy(t["ref"])},
                    torch.from_numpy(t["candidate"].astype(np.float32)))
    assert np.array_equal(kept.numpy(), t["candidate"])


def test_score_names_are_checked():
    from parallel.score_functions import parse_score, score_inputs

    assert parse_score("reference & entropy") == (("reference", "entropy"), "&")
    assert score_inputs("training|random") == {"random"}
    for bad in ("loss", "excess&", "excess&excess", "excess&reference|random"):
        with pytest.raises(ValueError, match="expected one of"):
            parse_score(bad)


def test_random_draws_depend_on_the_seed_and_the_sample_only():
    from parallel.data import random_draws

    a = random_draws(1234, 17, 64)
    assert torch.equal(a, random_draws(1234, 17, 64)) and a.dtype == torch.float32
    assert not torch.equal(a, random_draws(1235, 17, 64)) and not torch.equal(a, random_draws(1234, 18, 64))
    assert 0.0 <= float(a.min()) and float(a.max()) < 1.0


# ------------------------------------------------------------------------------------------ offline

@pytest.fixture(scope="module")
def three_stores(tmp_path_factory, hf_tokenizer_dir):
    """A tokenized corpus with reference, base and reference-entropy stores of distinct values."""
    from conftest import CORPUS, write_jsonl
    from rhocli.core.formats.tokens import TokenDataset

    d = tmp_path_factory.mktemp("three_stores")
    write_jsonl(d / "c.jsonl", [{"text": t} for t in CORPUS[:12]])
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "rhocli", "tokenize", str(d / "c.jsonl"), "-t", str(hf_tokenizer_dir),
                    "-o", str(d / "c"), "-w", "1", "-q"], check=True, capture_output=True)
    ds = TokenDataset(d / "c")
    lengths = ds.document_lengths()
    rng = np.random.default_rng(3)
    n = int(np.sum(lengths))
    ends = np.concatenate([[0], np.cumsum(lengths)])
    flat = {k: (rng.permutation(n) / 64.0).astype(np.float32) for k in ("ref", "base", "entropy")}
    for name, prefix in (("ref", "ref"), ("base", "base"), ("entropy", "ref.entropy")):
        write_score_store(d / prefix, d / "c", [flat[name][ends[i]:ends[i + 1]] for i in range(len(lengths))], ds.fingerprint())
    return d, lengths, flat


@pytest.mark.parametrize("score", ["excess", "reference", "training", "entropy", "random", "reference&entropy",
                                   "training|reference"])
def test_offline_selection_is_the_top_k_of_its_score(three_stores, tmp_path, capsys, score):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    d, lengths, flat = three_stores
    flag = "--select-by" if ("&" in score or "|" in score) else "--score"  # one option, rho train's name too
    r = run_rho(capsys, "select", "--scores", d / "ref", "--base-scores", d / "base", flag, score, "--seed", 7,
                "--ratio", 0.3, "--output", tmp_path / "m")
    assert r.exit_code == 0, r.stderr
    masks = IndexedDataset(str(tmp_path / "m"), mmap=True)
    got = np.concatenate([np.asarray(masks[i]) for i in range(len(masks))]).astype(bool)
    t = {"ref": flat["ref"], "loss": flat["base"], "entropy": flat["entropy"],
         "random": np.random.default_rng(7).random(flat["ref"].size, dtype=np.float32)}
    ends = np.concatenate([[0], np.cumsum(lengths)])
    expected = np.concatenate([
        _expected(score, {k: v[None, ends[i]:ends[i + 1]] for k, v in t.items()}, np.ones((1, lengths[i]), bool), 0.3)[0]
        for i in range(len(lengths))])
    assert np.array_equal(got, expected)
    manifest = json.loads(Path(str(tmp_path / "m") + ".json").read_text())
    assert manifest["selection"]["score"] == score and ("seed" in manifest["selection"]) == ("random" in score)


def test_offline_bad_scores_are_one_line(three_stores, tmp_path, capsys):
    d, _, _ = three_stores
    r = run_rho(capsys, "select", "--scores", d / "ref", "--score", "training", "--output", tmp_path / "m")
    assert r.exit_code != 0 and "--score training needs --base-scores" in r.stderr
    r = run_rho(capsys, "select", "--scores", d / "base", "--score", "entropy", "--output", tmp_path / "m")
    assert r.exit_code != 0 and "rho score --entropy" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_rho(capsys, "select", "--scores", d / "ref", "--score", "perplexity", "--output", tmp_path / "m")
    assert r.exit_code != 0 and "--score 'perplexity': expected one of" in r.stderr
    assert not Path(str(tmp_path / "m") + ".bin").exists()
