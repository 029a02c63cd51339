"""rho score and selective rho train on CPU with real process groups.

Ground truths: megatron's own GPTDataset sample indices (alignment), a plain causal-LM run
(ratio 1.0), a TP1PP1 run (layouts), an uninterrupted run (resume), a DP1 scoring run (DP split)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, write_jsonl
from rho_cli import run_rho
from train_utils import grad_norms, losses, model_tensors, rho, write_tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, hf_tokenizer_dir):
    d = tmp_path_factory.mktemp("sel")
    # documents of very different lengths, some longer than the scoring window (sliding windows)
    records = [{"text": " ".join([CORPUS[(i * 5 + j) % len(CORPUS)] for j in range(1 + i % 9)])} for i in range(400)]
    write_jsonl(d / "c.jsonl", records)
    rho("tokenize", d / "c.jsonl", "-t", hf_tokenizer_dir, "-o", d / "c", "-w", "1")
    config = write_tiny_config(d)
    rho("train", config, "--data", d / "c", "--save", d / "ref", "--steps", 4, "--stop-after", 2, "-q")
    # with the reference entropy beside the losses (c.ref.entropy: --select-by entropy)
    rho("score", "--model", d / "ref", "--data", d / "c", "--output", d / "c.ref", "--seq-len", 32,
        "--shard-documents", 80, "--entropy", "-q")
    return d, config


@pytest.fixture(scope="module")
def tp1_run(corpus, tmp_path_factory):
    """``tp1_run(*args)``: the TP1 run directory of ``rho train CONFIG *args`` on the corpus, trained
    once per module for the tests that compare a parallel layout with the same selection at TP1."""
    d, config = corpus
    runs = {}

    def run(*args):
        key = tuple(map(str, args))
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("tp1") / "run"
            rho("train", config, *args, "--save", runs[key])
        return runs[key]

    return run


def _read_store(prefix: Path) -> tuple[np.ndarray, np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return np.array(ds.sequence_lengths), np.concatenate([ds[i] for i in range(len(ds))])  # copies: ds unmaps


def test_score_store_is_aligned_and_complete(corpus):
    d, _ = corpus
    manifest = json.loads((d / "c.ref.json").read_text())
    tokens = json.loads((d / "c.json").read_text())
    assert manifest["token_dataset"]["fingerprint"] == tokens["fingerprint"]
    assert manifest["window"] == {"tokens": 32, "stride": 16}
    score_lengths, values = _read_store(d / "c.ref")
    token_lengths, _ = _read_store(d / "c")
    assert np.array_equal(score_lengths, token_lengths)  # same document boundaries
    assert values.dtype == np.float32 and np.isfinite(values).all() and (values > 0).all()
    assert token_lengths.max() > 32  # some documents needed the sliding window
    # the entropy store: the same documents, values in [0, ln(vocab)]
    entropy_manifest = json.loads((d / "c.ref.entropy.json").read_text())
    assert entropy_manifest["token_dataset"] == manifest["token_dataset"] and "entropy" in entropy_manifest["value"]
    entropy_lengths, entropies = _read_store(d / "c.ref.entropy")
    assert np.array_equal(entropy_lengths, token_lengths)
    assert np.isfinite(entropies).all() and (entropies >= 0).all() and entropies.max() <= np.log(512) + 1e-4


def test_scores_equal_a_direct_forward_of_the_same_windows(corpus, tmp_path):
    """Ground truth for the window logic: rho's scores equal the per-token losses of the same model on
    the same context, computed here window by window from megatron's GPTModel logits with PyTorch's
    own ``F.cross_entropy`` (independent of rho's fused kernel, packing and padding)."""
    d, _ = corpus
    script = tmp_path / "direct.py"
    script.write_text(f'''
import json, os, sys, numpy as np, torch
import torch.nn.functional as F
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="{29700 + os.getpid() % 200}")
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from parallel.distributed import init_distributed
from parallel.checkpoint import load_checkpoint
from parallel.config import ModelConfig
from parallel.model import build_model, model_shape
from rhocli.core.formats import checkpoint as ckpt
from megatron.core.datasets.indexed_dataset import IndexedDataset
init_distributed(1, 1, 0)
step = ckpt.resolve_checkpoint({str(d / "ref")!r}); man = ckpt.read_manifest(step)
cfg = ModelConfig(**man["model"]); shape = model_shape(cfg, man["vocab_size"], 1, torch.float32)
m = build_model(cfg, shape, 1, 1, True, True); load_checkpoint(step, [m]); m.eval()
toks = IndexedDataset({str(d / "c")!r}); scores = IndexedDataset({str(d / "c.ref")!r})
entropies = IndexedDataset({str(d / "c.ref.entropy")!r}); worst_h = 0.0
eod = json.load(open({str(d / "c.json")!r}))["tokenizer"]["eod_id"]
worst, checked = 0.0, 0
for i in range(40):
    doc = toks[i].astype(np.int64); ext = [eod] + doc.tolist(); n = len(doc)
    # first window: tokens 0..min(n,32)-1 from [EOD] + doc[:31]; second window (n > 32): starts at 16,
    # its positions 16..31 score tokens 32..47
    spans = [(0, min(n, 32), 0)] + ([(16, min(n, 48), 16)] if n > 32 else [])
    for start, end, first_new in spans:
        inp = torch.tensor([ext[start:end]]); lab = torch.tensor(ext[start + 1:end + 1])
        with torch.no_grad():
            logits = m(inp, torch.arange(end - start)[None], attention_mask=None)[0]  # [s, padded vocab]
        # over the true vocabulary: the padding rows are no tokens (parallel.model.padded_vocab_columns)
        loss = F.cross_entropy(logits[:, :man["vocab_size"]].double(), lab, reduction="none")
        new = loss[first_new:] if start else loss
        got = torch.from_numpy(scores[i].copy()).double()[start + first_new:end] if start else torch.from_numpy(scores[i].copy()).double()[:end]
        worst = max(worst, float((new - got).abs().max())); checked += 1
        # the entropy: torch.distributions' own, over the true vocabulary
        h = torch.distributions.Categorical(logits=logits[:, :man["vocab_size"]].double()).entropy()
        h_new = h[first_new:] if start else h
        h_got = torch.from_numpy(entropies[i].copy()).double()[start + first_new:end] if start else torch.from_numpy(entropies[i].copy()).double()[:end]
        worst_h = max(worst_h, float((h_new - h_got).abs().max()))
print("RESULT", worst, checked, worst_h)
''')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    worst, checked, worst_entropy = float(line[0].split()[1]), int(line[0].split()[2]), float(line[0].split()[3])
    assert checked > 40 and worst < 1e-4  # some documents needed a second window
    assert worst_entropy < 1e-4


def test_score_dp2_identical_and_tp2_within_tolerance(corpus, tmp_path):
    d, _ = corpus
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    rho("score", "--model", d / "ref", "--data", d / "c", "--output", tmp_path / "dp2", "--seq-len", 32,
        "--shard-documents", 80, "--dp", 2, "-q", timeout=600, env_extra={"TMPDIR": str(scratch)})
    # the launcher's error reports are removed with the run
    assert list(scratch.iterdir()) == []
    assert (tmp_path / "dp2.bin").read_bytes() == (d / "c.ref.bin").read_bytes()
    assert (tmp_path / "dp2.idx").read_bytes() == (d / "c.ref.idx").read_bytes()
    # TP2 x PP2 with sequence parallelism (each TP rank's norms hold half of every window; the hidden
    # states are gathered before the output layer), and the entropy merged across the TP shards of
    # the vocabulary
    rho("score", "--model", d / "ref", "--data", d / "c", "--output", tmp_path / "tp2", "--seq-len", 32,
        "--shard-documents", 80, "--tp", 2, "--pp", 2, "--sequence-parallel", "--entropy", "-q", timeout=600)
    _, a = _read_store(tmp_path / "tp2")
    _, b = _read_store(d / "c.ref")
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(_read_store(tmp_path / "tp2.entropy")[1] - _read_store(d / "c.ref.entropy")[1]).max() < 1e-5


def test_score_resumes_after_kill_and_never_publishes_partial(corpus, tmp_path, capsys):
    d, _ = corpus
    out = tmp_path / "s"
    args = [sys.executable, "-m", "rhocli", "score", "--model", str(d / "ref"), "--data", str(d / "c"),
            "--output", str(out), "--seq-len", "32", "--shard-documents", "80", "-q"]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    work = Path(str(out) + ".rho-work")
    while time.time() < deadline and not (work / "shard_000001.done").exists():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not Path(str(out) + ".json").exists() and not Path(str(out) + ".bin").exists()
    done = sorted(p.name for p in work.glob("*.done"))
    assert done and len(done) < 4
    r = run_rho(capsys, *args[3:])  # without --resume: refused
    assert r.exit_code == 5 and "--resume" in r.stderr
    # a resume with another setting would finish a store made of two runs' shards: refused
    for flag, value in (("--stride", "8"), ("--shard-documents", "40")):
        changed = [*args[3:], "--resume", flag, value]
        r = run_rho(capsys, *changed)
        assert r.exit_code == 6 and flag in r.stderr and "cannot resume with other settings" in r.stderr, r.stderr
    seq = args.index("--seq-len")
    r = run_rho(capsys, *args[3:seq], "--seq-len", "16", *args[seq + 2:], "--resume")
    assert r.exit_code == 6 and "--seq-len was 32, now 16" in r.stderr, r.stderr
    rho(*args[3:], "--resume")
    assert Path(str(out) + ".bin").read_bytes() == (d / "c.ref.bin").read_bytes()
    assert not work.exists()


def test_reference_losses_are_sliced_like_gpt_dataset_tokens(corpus, tmp_path):
    """A fake score store whose value at each token is that token's id: every training sample's
    ref_loss must then equal its labels, which proves the alignment through GPTDataset's own indices
    (samples that span documents and start mid-document included)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from parallel.data import DataSpec, TokenIds, build_datasets

    d, _ = corpus
    toks = IndexedDataset(str(d / "c"))
    builder = IndexedDatasetBuilder(str(tmp_path / "ids.bin"), dtype=np.float32)
    for i in range(len(toks)):
        builder.add_document(toks[i].astype(np.float32), [len(toks[i])])
    builder.finalize(str(tmp_path / "ids.idx"))
    spec = DataSpec(prefixes=(str(d / "c"),), weights=None, seq_length=32, seed=7, split="100,0,0",
                    token_ids=TokenIds(vocab_size=512, eod=0), cache_dir=None, scores=(str(tmp_path / "ids"),))
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        train, _ = build_datasets(spec, 300, 0)
        for i in range(len(train)):
            sample = train[i]
            assert torch.equal(sample["ref_loss"], sample["labels"].float()), i
    finally:
        dist.destroy_process_group()


def test_select_ratio_one_is_plain_training_bit_for_bit(corpus, tmp_path):
    d, config = corpus
    common = ("--data", d / "c", "--init", d / "ref", "--steps", 3, "-q")
    rho("train", config, *common, "--save", tmp_path / "plain")
    rho("train", config, *common, "--save", tmp_path / "slm1", "--scores", d / "c.ref", "--select-ratio", "1.0")
    assert losses(tmp_path / "plain") == losses(tmp_path / "slm1")
    a, b = model_tensors(tmp_path / "plain" / "step_000003"), model_tensors(tmp_path / "slm1" / "step_000003")
    assert all((a[k] == b[k]).all() for k in a)


# the parallel run also switches on scale features (selection must not notice them): sequence
# parallelism with selective recompute, or the interleaved schedule with the overlapped gradient
# reduction. The second run also ranks by two other score functions at once (training loss or a
# random draw: their union), after a one-step warm-up, with a kept fraction falling 0.9 -> 0.5.
@pytest.mark.parametrize("scope,features,selection", [
    ("sequence", ("--sequence-parallel", "--recompute", "selective"), ("--select-ratio", "0.6")),
    ("microbatch", ("--virtual-pp", 2, "--set", "train.overlap_grad_reduce=true"),
     ("--select-by", "training|random", "--select-after", 1, "--select-ratio", "0.9:0.5")),
    ("batch", (), ("--select-by", "reference&entropy", "--select-ratio", "0.6")),
], ids=["sequence-sp-recompute", "microbatch-vpp-overlap-training|random", "batch-reference&entropy"])
def test_tp2pp2_slm_equals_tp1pp1(corpus, tp1_run, tmp_path, scope, features, selection):
    d, config = corpus
    common = ("--data", d / "c", "--init", d / "ref", "--steps", 3, "--scores", d / "c.ref",
              "--select-scope", scope, "-q", *selection)
    a = tp1_run(*common)
    rho("train", config, *common, "--save", tmp_path / "b", "--tp", 2, "--pp", 2, *features, timeout=600)
    la, lb = losses(a), losses(tmp_path / "b")
    assert sorted(la) == [1, 2, 3]
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5)
    metrics = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r for r in metrics if "loss" in r]
    other = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [r["tokens"] for r in steps] == [r["tokens"] for r in other if "loss" in r]  # the same kept counts
    if "reference&entropy" in selection:
        # step 1 (the batch scope's first: top-k of the micro-batch) keeps the intersection of two
        # top-60 % sets, so 20-60 %; later steps keep by each function's threshold from the step before
        assert 0.2 <= steps[0]["kept_fraction"] <= 0.6 and all(0 < r["kept_fraction"] < 1 for r in steps)
        return
    if "--select-by" in selection:
        # warm-up, then 0.9 -> 0.5; every label is a candidate; the union of two top-k sets of a 2 x 32
        # token micro-batch keeps at least k of them
        assert [r["select_ratio"] for r in steps] == [1.0, 0.9, 0.5]
        assert steps[0]["kept_fraction"] == 1.0 and steps[1]["kept_fraction"] >= 58 / 64
        assert 32 / 64 <= steps[2]["kept_fraction"] < 1.0
        return
    m = steps[0]
    # every label is a candidate; k = floor(0.6 * n + 0.5) of each 32-token sequence (19) or of each
    # 2 x 32-token micro-batch (38): 19/32 of the tokens either way
    assert m["kept_fraction"] == 19 / 32
    # the kept and dropped means, summed separately, recombine into the mean over every token
    f = m["kept_fraction"]
    assert f * m["kept_loss"] + (1 - f) * m["dropped_loss"] == pytest.approx(m["all_tokens_loss"], rel=1e-9)
    assert m["dropped_loss"] != m["kept_loss"] and "ref_loss" in m and "mean_excess" in m
    # Rho-1's premise: kept tokens have the larger excess
    assert m["kept_loss"] - m["kept_ref_loss"] > m["mean_excess"]


def test_random_control_keeps_the_ratio_and_is_reproducible(corpus, tmp_path):
    """--select-by random needs no scores, keeps exactly k of each sequence, and repeats from its seed."""
    d, config = corpus
    common = ("--data", d / "c", "--init", d / "ref", "--steps", 2, "--select-by", "random", "--select-ratio", "0.5", "-q")
    rho("train", config, *common, "--save", tmp_path / "a")
    rho("train", config, *common, "--save", tmp_path / "b")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    metrics = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [r["kept_fraction"] for r in metrics if "loss" in r] == [16 / 32, 16 / 32]


# context parallelism: each rank holds two chunks of every sequence; the top-k must still be taken
# over whole sequences (sequence scope, at DP2 too: it does not depend on DP) and over every token
# of the batch (batch scope, whose first step is the micro-batch scope; with TP2 beside CP2)
@pytest.mark.parametrize("scope,layout", [("sequence", ("--cp", 2, "--dp", 2)), ("batch", ("--cp", 2, "--tp", 2))],
                         ids=["sequence-cp2-dp2", "batch-cp2-tp2"])
def test_cp2_slm_equals_cp1(corpus, tp1_run, tmp_path, scope, layout):
    d, config = corpus
    # the same arguments, in the same order, as test_tp2pp2_slm_equals_tp1pp1's sequence run: one TP1 run
    common = ("--data", d / "c", "--init", d / "ref", "--steps", 3, "--scores", d / "c.ref",
              "--select-scope", scope, "-q", "--select-ratio", "0.6")
    a = tp1_run(*common)
    rho("train", config, *common, "--save", tmp_path / "b", *layout, timeout=600)
    la, lb = losses(a), losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == [1, 2, 3]
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5)
    assert grad_norms(tmp_path / "b") == pytest.approx(grad_norms(a), abs=1e-5)


def test_dp2_slm_under_the_distributed_optimizer_equals_dp1(corpus, tmp_path):
    """Selection at DP2 with the distributed optimizer and the overlapped gradient reduction and
    parameter gather: the same kept tokens and losses as DP1 with the plain optimizer, weights within
    1e-6 (only the reduction order differs). The sequence scope, the one that is layout-invariant:
    microbatch and batch rank over micro_batch x dp sequences by design (docs/selective.md)."""
    d, config = corpus
    common = ("--data", d / "c", "--init", d / "ref", "--steps", 3, "--scores", d / "c.ref", "--select-ratio", "0.6",
              "--select-scope", "sequence", "--set", "train.optimizer=adam", "-q")
    rho("train", config, *common, "--save", tmp_path / "dp1")
    rho("train", config, *common, "--save", tmp_path / "dp2", "--dp", 2, "--distributed-optimizer",
        "--set", "train.overlap_grad_reduce=true", "--set", "train.overlap_param_gather=true", timeout=600)
    la, lb = losses(tmp_path / "dp1"), losses(tmp_path / "dp2")
    assert sorted(la) == sorted(lb) == [1, 2, 3]
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5)
    kept = [[json.loads(l).get("kept_fraction") for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
             if l.strip() and "loss" in json.loads(l)] for run in ("dp1", "dp2")]
    assert kept[0] == kept[1] and all(0 < k < 1 for k in kept[0])
    a, b = model_tensors(tmp_path / "dp1" / "step_000003"), model_tensors(tmp_path / "dp2" / "step_000003")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_resume_is_exact_with_batch_selection(corpus, tmp_path):
    """The split run recomputes activations and saves asynchronously; neither changes a bit."""
    d, config = corpus
    common = ("--data", d / "c", "--init", d / "ref", "--steps", 4, "--scores", d / "c.ref",
              "--select-ratio", "0.6", "--select-scope", "batch", "--set", "train.optimizer=adam", "-q")
    features = ("--recompute", "full", "--async-save")
    rho("train", config, *common, "--save", tmp_path / "straight")
    rho("train", config, *common, *features, "--save", tmp_path / "split", "--stop-after", 2)
    manifest = json.loads((tmp_path / "split" / "step_000002" / "rho_checkpoint.json").read_text())
    assert manifest["selection"]["thresholds"]["excess"] is not None  # one per score function
    rho("train", config, "--data", d / "c", "--save", tmp_path / "split", "--steps", 4, "--scores", d / "c.ref",
        "--select-ratio", "0.6", "--select-scope", "batch", "--set", "train.optimizer=adam", "--resume", *features, "-q")
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_score_checks_the_layout_like_train(corpus, tmp_path):
    """rho score refuses a --dp that does not match the world size, as rho train does (one check)."""
    d, _ = corpus
    r = rho("score", "--model", d / "ref", "--data", d / "c", "--output", tmp_path / "s", "--dp", 3, check=False,
            env_extra={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"})
    assert r.returncode == 2 and "--dp 3 does not match world size 2 / (tp 1 x pp 1) = 2" in r.stderr, r.stderr
    assert not (tmp_path / "s.json").exists()


def test_scores_of_other_tokens_are_refused(corpus, tmp_path, hf_tokenizer_dir, capsys):
    d, config = corpus
    write_jsonl(tmp_path / "o.jsonl", [{"text": t} for t in CORPUS[:50]])
    rho("tokenize", tmp_path / "o.jsonl", "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1")
    r = run_rho(capsys, "train", config, "--data", tmp_path / "o", "--save", tmp_path / "run", "--scores", d / "c.ref",
            "--select-ratio", "0.6")
    assert r.exit_code == 6 and "scores token dataset" in r.stderr
    r = run_rho(capsys, "train", config, "--data", d / "c", "--save", tmp_path / "run", "--select-ratio", "0.6")
    assert r.exit_code == 2 and "needs --scores" in r.stderr


def test_static_mask_from_rho_select(corpus, tmp_path):
    """rho train --mask: an all-ones mask is plain training bit for bit; a 50 % mask from rho select
    trains on (about) half of the tokens."""
    d, config = corpus
    rho("select", "--scores", d / "c.ref", "--score", "reference", "--ratio", "1.0", "--output", tmp_path / "all")
    rho("select", "--scores", d / "c.ref", "--score", "reference", "--ratio", "0.5", "--output", tmp_path / "half")
    common = ("--data", d / "c", "--init", d / "ref", "--steps", 2, "-q")
    rho("train", config, *common, "--save", tmp_path / "plain")
    rho("train", config, *common, "--save", tmp_path / "ones", "--mask", tmp_path / "all")
    rho("train", config, *common, "--save", tmp_path / "half_run", "--mask", tmp_path / "half")
    assert losses(tmp_path / "ones") == losses(tmp_path / "plain")
    plain = [json.loads(l) for l in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    half = [json.loads(l) for l in (tmp_path / "half_run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    ratio = half[0]["tokens"] / plain[0]["tokens"]
    assert 0.4 < ratio < 0.6


def _mask_store(prefix: Path, tokens_prefix: Path, keep) -> None:
    """A mask store for the token dataset at ``tokens_prefix`` keeping the flat token indices ``keep``."""
    from rhocli.core.formats.masks import write_mask_store
    from rhocli.core.formats.tokens import TokenDataset

    ds = TokenDataset(tokens_prefix)
    lengths = ds.document_lengths()
    mask = np.zeros(int(lengths.sum()), dtype=bool)
    mask[list(keep)] = True
    write_mask_store(prefix, mask, lengths, {"token_dataset": {"prefix": str(tokens_prefix), "fingerprint": ds.fingerprint()},
                                             "kept": int(mask.sum()), "tokens": int(mask.size)})


def test_nothing_to_train_on_is_refused_or_skipped(corpus, tmp_path, capsys):
    """A selection that keeps nothing is refused before training; a batch with no kept token is a
    reported, skipped step (no optimizer step, so no weight decay moves the weights), not a NaN loss."""
    import torch

    d, config = corpus
    r = run_rho(capsys, "select", "--scores", d / "c.ref", "--score", "reference", "--ratio", "0", "--output", tmp_path / "m0")
    assert r.exit_code == 2 and "--ratio" in r.stderr and not (tmp_path / "m0.json").exists()
    _mask_store(tmp_path / "none", d / "c", [])
    r = run_rho(capsys, "train", config, "--data", d / "c", "--init", d / "ref", "--mask", tmp_path / "none", "--save", tmp_path / "r0",)
    assert r.exit_code == 2 and "keeps no token" in r.stderr and not (tmp_path / "r0" / "latest").exists()
    # one kept token in the whole corpus: (almost) every batch keeps none
    _mask_store(tmp_path / "one", d / "c", [5])
    run = tmp_path / "run"
    rho("train", config, "--data", d / "c", "--init", d / "ref", "--mask", tmp_path / "one", "--save", run, "--steps", 3,
        "--set", "train.optimizer=adam", "--set", "train.weight_decay=0.1", "-q")
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [m for m in records if "lr" in m]
    assert len(steps) == 3 and all(m["skipped"] == "no token kept" and m["loss"] is None and m["tokens"] == 0
                                   and m["grad_norm"] is None for m in steps), steps
    a, b = model_tensors(d / "ref" / "step_000002"), model_tensors(run / "step_000003")
    assert all(torch.equal(a[k], b[k]) for k in a)  # no step moved a weight


def test_damaged_scores_are_refused_with_the_file_named(corpus, tmp_path):
    d, config = corpus
    import shutil

    for ext in (".bin", ".idx", ".json"):
        shutil.copy(f"{d / 'c.ref'}{ext}", f"{tmp_path / 'bad'}{ext}")
    values = np.fromfile(tmp_path / "bad.bin", dtype=np.float32)
    values[::7] = np.nan
    values[3::7] = np.inf
    values.tofile(tmp_path / "bad.bin")
    r = rho("select", "--scores", tmp_path / "bad", "--score", "reference", "--ratio", "0.5", "--output", tmp_path / "m",
            check=False)
    assert r.returncode == 4 and f"{tmp_path / 'bad.bin'}: " in r.stderr and "non-finite" in r.stderr, r.stderr
    assert not (tmp_path / "m.json").exists()
    r = rho("train", config, "--data", d / "c", "--init", d / "ref", "--scores", tmp_path / "bad", "--select-ratio", "0.6",
            "--save", tmp_path / "run", "--steps", 2, "-q", check=False)
    # train hashes every store it reads before any worker starts (issue 27): the edit is named there
    assert r.returncode == 4 and f"--scores {tmp_path / 'bad'}: content fingerprint" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "latest").exists()


def test_stores_edited_after_they_were_written_are_refused_where_they_are_used(corpus, tmp_path, capsys):
    """Issue 27: a manifest is not trusted. train and select hash the content of every store they read
    against its manifest before anything uses it: a score store with one value doubled (still a
    plausible loss), token data changed in place, a .idx of other documents of the same size."""
    import shutil

    d, config = corpus
    for name in ("c", "c.ref"):
        for ext in (".bin", ".idx", ".json"):
            shutil.copy(f"{d / name}{ext}", f"{tmp_path / name}{ext}")
    train = ("train", config, "--data", tmp_path / "c", "--save", tmp_path / "run", "--steps", 2, "--dry-run")
    assert run_rho(capsys, *train, "--scores", tmp_path / "c.ref", "--select-ratio", "0.6").exit_code == 0
    values = np.fromfile(tmp_path / "c.ref.bin", dtype=np.float32)
    values[100] *= 2
    values.tofile(tmp_path / "c.ref.bin")
    r = run_rho(capsys, *train, "--scores", tmp_path / "c.ref", "--select-ratio", "0.6")
    assert r.exit_code == 4 and f"--scores {tmp_path / 'c.ref'}: content fingerprint" in r.stderr, r.stderr
    r = run_rho(capsys, "select", "--scores", tmp_path / "c.ref", "--score", "reference", "--ratio", "0.5",
                "--output", tmp_path / "m")
    assert r.exit_code == 4 and "content fingerprint" in r.stderr and not (tmp_path / "m.json").exists(), r.stderr
    tokens = np.fromfile(tmp_path / "c.bin", dtype=np.uint16)
    tokens[10] = (tokens[10] + 1) % 400
    tokens.tofile(tmp_path / "c.bin")
    r = run_rho(capsys, *train)
    assert r.exit_code == 4 and f"--data {tmp_path / 'c'}: content fingerprint" in r.stderr, r.stderr
    shutil.copy(d / "c.bin", tmp_path / "c.bin")
    # the .idx of other documents of the same size: megatron's layout (a 34-byte header, int32 lengths,
    # int64 byte pointers) with the boundary between documents 0 and 1 moved by one token; consistent
    idx = bytearray((tmp_path / "c.idx").read_bytes())
    n = int(np.frombuffer(bytes(idx[18:26]), dtype=np.int64)[0])
    lengths = np.frombuffer(bytes(idx[34:34 + 4 * n]), dtype=np.int32).copy()
    pointers = np.frombuffer(bytes(idx[34 + 4 * n:34 + 12 * n]), dtype=np.int64).copy()
    lengths[0] += 1
    lengths[1] -= 1
    pointers[1] += 2  # uint16 tokens
    idx[34:34 + 12 * n] = lengths.tobytes() + pointers.tobytes()
    (tmp_path / "c.idx").write_bytes(bytes(idx))
    r = run_rho(capsys, *train)
    assert r.exit_code == 4 and f"--data {tmp_path / 'c'}: content fingerprint" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_verify_reads_everything_and_resume_checks_the_checkpoint(corpus, tmp_path, capsys):
    """rho verify passes sound stores and a checkpoint, and names what a changed byte or a truncated
    shard damaged; rho train --resume refuses a checkpoint with a truncated shard before it starts."""
    import shutil

    d, config = corpus
    ok = rho("verify", d / "c", d / "c.ref", d / "ref")
    assert "verified 3 of 3" in " ".join(ok.stdout.split())
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(f"{d / 'c.ref'}{ext}", f"{tmp_path / 's'}{ext}")
    values = np.fromfile(tmp_path / "s.bin", dtype=np.float32)
    values[100] += 1.0  # still a finite, plausible loss: only the content fingerprint can tell
    values.tofile(tmp_path / "s.bin")
    r = run_rho(capsys, "verify", tmp_path / "s")
    assert r.exit_code == 4 and "content fingerprint" in r.stderr and "differs" in r.stderr, r.stderr
    run = tmp_path / "run"
    shutil.copytree(d / "ref", run)
    shard = sorted((run / "step_000002").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    r = run_rho(capsys, "verify", run)
    assert r.exit_code == 4 and f"{shard}: " in r.stderr and "truncated" in r.stderr, r.stderr
    r = run_rho(capsys, "train", config, "--data", d / "c", "--save", run, "--steps", 4, "--resume", "-q")
    assert r.exit_code == 4 and f"--resume {shard}: " in r.stderr, r.stderr
