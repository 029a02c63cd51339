"""The excess on one context: the reference model online (``rho train --reference``) and sample score
stores (``rho score --for-run``), on CPU with real process groups.

Ground truth: ``transformers``' own LlamaForCausalLM (the reference is a Hugging Face model built by
transformers) run on each training sample's tokens, whole (stream packing: the sample's own earlier
tokens, the previous document's included, are the context) or document by document
(``--separate-documents``); its per-token cross-entropy must be what selection used, as the selection
trace records it. Also: online == sample store bit for bit at one layout, TP2PP2 == TP1, refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, write_jsonl
from rho_cli import run_rho
from train_utils import losses, rho

pytestmark = pytest.mark.slow

#: the shape of hf_models.tiny_hf_model's Llama (so --init and --reference can be HF directories)
CONFIG = """
model:
  num_layers: 4
  hidden_size: 64
  ffn_hidden_size: 160
  num_attention_heads: 4
  num_query_groups: 2
  max_position_embeddings: 256
  vocab_size: 512
train:
  steps: 2
  seq_length: 32
  micro_batch_size: 2
  global_batch_size: 8
  lr: 0.05
  min_lr: 0.005
  warmup_steps: 0
  lr_decay_style: constant
  optimizer: sgd
  weight_decay: 0.0
  clip_grad: 0.0
  eval_interval: 0
  split: "90,10,0"
"""
SELECT = ("--select-ratio", "0.6", "--trace-selection", "2", "-q")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hf_tokenizer_dir):
    """One set of runs shared by the tests: the reference and the starting weights are two random
    transformers Llamas; A online TP1 (stopped after step 1 and resumed), B online TP2PP2, C a TP1
    sample store's run (stream packing); D online TP2PP2 and E a TP2PP2 sample store's run with
    --separate-documents."""
    from hf_models import tiny_hf_model

    d = tmp_path_factory.mktemp("reference")
    # documents of very different lengths: samples start mid-document and hold several documents
    records = [{"text": " ".join([CORPUS[(i * 5 + j) % len(CORPUS)] for j in range(1 + i % 9)])} for i in range(300)]
    write_jsonl(d / "c.jsonl", records)
    rho("tokenize", d / "c.jsonl", "-t", hf_tokenizer_dir, "-o", d / "c", "-w", "1")
    tiny_hf_model("llama", d / "ref", hf_tokenizer_dir)
    tiny_hf_model("llama", d / "init", hf_tokenizer_dir, seed=11)
    config = d / "config.yaml"
    config.write_text(CONFIG)
    common = (config, "--data", d / "c", "--init", d / "init", *SELECT)
    separate = ("--separate-documents",)
    # A stops after step 1 and resumes: the reference has no state but its weights, so the resumed
    # run equals C (uninterrupted, from the store) bit for bit (test_sample_store_equals_online...)
    rho("train", *common, "--reference", d / "ref", "--save", d / "A", "--stop-after", 1)
    rho("train", config, "--data", d / "c", *SELECT, "--reference", d / "ref", "--save", d / "A", "--resume")
    rho("train", *common, "--reference", d / "ref", "--save", d / "B", "--tp", 2, "--pp", 2, timeout=600)
    rho("score", "--model", d / "ref", "--for-run", config, "--data", d / "c", "-o", d / "samples", "-q")
    rho("train", *common, "--scores", d / "samples", "--save", d / "C")
    rho("train", *common, *separate, "--reference", d / "ref", "--save", d / "D", "--tp", 2, "--pp", 2, timeout=600)
    rho("score", "--model", d / "ref", "--for-run", config, "--data", d / "c", "--set", "train.separate_documents=true",
        "-o", d / "samples.sep", "--tp", 2, "--pp", 2, "-q", timeout=600)
    rho("train", *common, *separate, "--scores", d / "samples.sep", "--save", d / "E", "--tp", 2, "--pp", 2, timeout=600)
    return d


def _trace(run: Path, step: int) -> dict[str, np.ndarray]:
    from rhocli.core.formats.selection_trace import read_trace

    return read_trace(run, step)


def _transformers_losses(model_dir: Path, tokens: np.ndarray, labels: np.ndarray, eod: int | None) -> np.ndarray:
    """transformers' per-token cross-entropy [n, s] of each row; ``eod``: each document of a row alone
    (a document ends with its EOD token; the next starts at position 0), else the row whole."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = np.zeros(tokens.shape, dtype=np.float64)
    with torch.no_grad():
        for r in range(tokens.shape[0]):
            ends = [i + 1 for i in np.flatnonzero(tokens[r] == eod)] if eod is not None else []
            bounds = [0] + [e for e in ends if e < tokens.shape[1]] + [tokens.shape[1]]
            for a, b in zip(bounds[:-1], bounds[1:]):
                ids = torch.from_numpy(tokens[r, a:b].astype(np.int64))[None]
                logits = model(ids).logits[0].double()
                target = torch.from_numpy(labels[r, a:b].astype(np.int64))
                out[r, a:b] = torch.nn.functional.cross_entropy(logits, target, reduction="none").numpy()
    return out


@pytest.mark.parametrize("run, separate", [("A", False), ("B", False), ("C", False), ("D", True), ("E", True)])
def test_reference_losses_used_equal_transformers_on_the_samples(runs, run, separate):
    """Online (A, B, D) and from a sample store (C, E), TP1 and TP2PP2, stream-packed and with the
    documents kept apart: the reference losses selection ranked by are transformers' own."""
    eod = json.loads((runs / "c.json").read_text())["tokenizer"]["eod_id"]
    for step in (1, 2):
        t = _trace(runs / run, step)
        assert t["samples"].tolist() == list(range((step - 1) * 8, step * 8))  # every sample of the step, once
        truth = _transformers_losses(runs / "ref", t["tokens"], t["labels"], eod if separate else None)
        assert np.abs(t["ref_loss"] - truth).max() < 1e-4
        if not separate and step == 1:
            # the context matters: a later document's tokens are scored after the earlier one's
            apart = _transformers_losses(runs / "ref", t["tokens"], t["labels"], eod)
            assert np.abs(apart - truth).max() > 0.1
        # what was kept: 60 % of each sequence by excess = training loss - that reference loss
        kept = t["kept"].astype(bool)
        assert (kept.sum(axis=1) == 19).all()
        excess = t["loss"] - t["ref_loss"]
        for r in range(kept.shape[0]):
            assert excess[r][kept[r]].min() >= excess[r][~kept[r]].max() - 1.0 / 1024


@pytest.mark.parametrize("online, store", [("A", "C"), ("D", "E")])
def test_sample_store_equals_online_bit_for_bit(runs, online, store):
    """At one layout the store's run selects exactly what the online run selects, and trains the same
    (A was stopped and resumed: the online reference resumes exactly)."""
    for step in (1, 2):
        a, b = _trace(runs / online, step), _trace(runs / store, step)
        assert set(a) == set(b)
        for key in a:
            assert np.array_equal(a[key], b[key]), key
    assert losses(runs / online) == losses(runs / store)


def test_tp2pp2_online_equals_tp1_online(runs):
    la, lb = losses(runs / "A"), losses(runs / "B")
    assert sorted(la) == [1, 2]
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5)
    for step in (1, 2):
        a, b = _trace(runs / "A", step), _trace(runs / "B", step)
        assert np.abs(a["ref_loss"] - b["ref_loss"]).max() < 1e-5
        assert np.array_equal(a["kept"], b["kept"])


def test_the_run_records_its_reference_and_a_resume_must_keep_it(runs, tmp_path, capsys, hf_tokenizer_dir):
    from hf_models import tiny_hf_model

    step_dir = sorted((runs / "A").glob("step_*"))[-1]
    recorded = json.loads((step_dir / "rho_checkpoint.json").read_text())
    assert recorded["reference"]["format"] == "huggingface" and recorded["reference"]["fingerprint"].startswith("sha256:")
    store = json.loads((runs / "samples.json").read_text())
    assert store["format"] == "rho.sample_scores" and store["samples"] == 16 and store["seq_length"] == 32
    assert store["reference_model"]["fingerprint"] == recorded["reference"]["fingerprint"]
    tiny_hf_model("llama", tmp_path / "other", hf_tokenizer_dir, seed=5)
    r = run_rho(capsys, "train", runs / "config.yaml", "--data", runs / "c", "--save", runs / "A", "--resume",
                "--steps", 3, "--reference", tmp_path / "other", *SELECT[:2])
    assert r.exit_code == 6 and "--reference: another model" in r.stderr and r.stderr.count("\n") == 1


def test_refusals_name_the_cause_and_write_nothing(runs, tmp_path, capsys, hf_tokenizer_dir):
    from hf_models import tiny_hf_model

    config, data = runs / "config.yaml", runs / "c"

    def train(*extra):
        r = run_rho(capsys, "train", config, "--data", data, "--save", tmp_path / "run", *extra)
        assert not (tmp_path / "run").exists() and r.stderr.count("\n") == 1, r.stderr
        return r

    # a sample store made for another pipeline: the first difference named
    r = train("--scores", runs / "samples", "--select-ratio", "0.6", "--steps", 3)
    assert r.exit_code == 6 and "--steps x --global-batch-size: store 16, this run 24" in r.stderr
    r = train("--scores", runs / "samples", "--select-ratio", "0.6", "--seed", 7)
    assert r.exit_code == 6 and "--seed: store 1234, this run 7" in r.stderr
    r = train("--scores", runs / "samples.sep", "--select-ratio", "0.6")
    assert r.exit_code == 6 and "--separate-documents" in r.stderr
    # a store and the reference online at once
    r = train("--scores", runs / "samples", "--reference", runs / "ref", "--select-ratio", "0.6")
    assert r.exit_code == 2 and "--reference and --scores exclude each other" in r.stderr
    r = train("--reference", runs / "ref")
    assert r.exit_code == 2 and "--reference needs --select-ratio" in r.stderr
    r = train("--reference", runs / "ref", "--select-ratio", "0.6", "--select-by", "random")
    assert r.exit_code == 2 and "reads no reference model" in r.stderr
    # a reference that does not predict the run's tokens, or that the layout cannot split
    tiny_hf_model("llama", tmp_path / "v600", hf_tokenizer_dir, vocab_size=600)
    r = train("--reference", tmp_path / "v600", "--select-ratio", "0.6")
    assert r.exit_code == 6 and "vocabulary 600 differs from the run's 512" in r.stderr
    tiny_hf_model("llama", tmp_path / "kv1", hf_tokenizer_dir, num_key_value_heads=1)
    r = train("--reference", tmp_path / "kv1", "--select-ratio", "0.6", "--tp", 2, "--dry-run")
    assert r.exit_code == 6 and "does not fit the reference model" in r.stderr


def test_verify_checks_a_sample_store(runs, tmp_path, capsys):
    import shutil

    r = run_rho(capsys, "verify", runs / "samples")
    assert r.exit_code == 0 and "sample score store" in r.stdout
    for ext in (".bin", ".json"):
        shutil.copy(runs / ("samples" + ext), tmp_path / ("s" + ext))
    with open(tmp_path / "s.bin", "r+b") as f:  # one value changed in place
        f.seek(400)
        f.write(np.float32(3.5).tobytes())
    r = run_rho(capsys, "verify", tmp_path / "s")
    assert r.exit_code != 0 and "fingerprint" in (r.stdout + r.stderr)


def test_analyze_context_recomputes_the_selection_and_bins_it_by_position(runs, capsys, tmp_path):
    """``rho analyze context``: the selection recomputed from the trace's training losses and a sample
    store equals what the engine kept online (the same inputs: Jaccard 1); the kept fractions by
    position are the trace's own, counted here with numpy."""
    from rhocli.analyze.context import context_report

    report = context_report(runs / "A", [str(runs / "samples")])
    assert report.steps == [1, 2] and report.jaccard == [1.0, 1.0] and report.source == "online reference"
    traces = [_trace(runs / "A", s) for s in (1, 2)]
    kept = np.concatenate([t["kept"] for t in traces]).astype(bool)
    assert list(report.by_position["run"]) == ["0-15", "16-31"]
    assert report.by_position["run"]["0-15"]["kept_fraction"] == pytest.approx(kept[:, :16].mean())
    assert report.by_position["run"]["16-31"]["kept_fraction"] == pytest.approx(kept[:, 16:].mean())
    assert report.by_position["other"] == report.by_position["run"]
    r = run_rho(capsys, "analyze", "context", runs / "A", "--output", tmp_path / "c.json")
    assert r.exit_code == 0 and "0-15" in r.stdout and json.loads((tmp_path / "c.json").read_text())["steps"] == [1, 2]


@pytest.mark.parametrize("change, words", [
    (("--set", "model.rope_theta=20000"), "model.rope_theta was 10000.0, now 20000.0"),
    (("--set", "model.norm_epsilon=1e-6"), "model.norm_epsilon was 1e-05, now 1e-06"),
    (("--set", "model.init_method_std=0.01"), "model.init_method_std was 0.02, now 0.01"),
    (("--seq-length", 64), "seq_length was 32, now 64"),
    (("--select-by", "reference"), "select_by was 'excess', now 'reference'"),
    (("--select-ratio", "1.0:0.6"), "select_ratio_start was None, now 1.0"),
])
def test_resume_refuses_any_change_to_the_numerics(runs, capsys, change, words):
    """Issue 27: a resume compares the whole model and train configuration, not only the shape."""
    r = run_rho(capsys, "train", runs / "config.yaml", "--data", runs / "c", "--save", runs / "A", "--resume",
                "--steps", 3, "--reference", runs / "ref", "--select-ratio", "0.6", *change)
    assert r.exit_code == 6 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
