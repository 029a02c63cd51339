"""rho train on instruction data: the response mask from rho tokenize, packed examples kept apart.

Ground truth: the first step's loss is recomputed by hand with transformers' own Llama (the --init
checkpoint exported by rho convert-hf) and PyTorch's cross-entropy, on the first global batch's
samples (megatron's GPTDataset, as training reads them), over the tokens the mask keeps. With
--separate-documents every packed example is run through the HF model on its own (unpacked, from
position 0), and that differs from running the packed sequences whole; the stream-packed run is
TP2PP2 (each pipeline stage reads the document mask), the whole-packed one TP1PP1. The kept labels are checked to be response
text, decoded and found in the examples by the test."""

from __future__ import annotations

import re

import numpy as np
import pytest

from rhocli.core.corpora import gsm8k_tora, read_jsonl, write_jsonl
from train_utils import losses, rho, write_tiny_config

SEQ = 128


@pytest.fixture(scope="module")
def sft(tmp_path_factory, gsm8k, llama2_sp):
    d = tmp_path_factory.mktemp("sft")
    problems = [r for r in (gsm8k_tora(x) for x in read_jsonl(gsm8k)[:90]) if r]
    records = problems[:48]
    for name, part in (("tora", records), ("heldout", problems[48:])):  # heldout: validation data of its own
        write_jsonl(d / f"{name}.jsonl", part)
        rho("tokenize", d / f"{name}.jsonl", "-t", llama2_sp, "-o", d / name, "-w", "1", "--prompt-key", "question",
            "--response-key", "solution", "--chat-template", "tora", "--mask-spans", "output", "-q")
    config = write_tiny_config(d)
    rho("train", config, "--data", d / "tora", "--save", d / "base", "--steps", 2, "--seq-length", SEQ, "-q")
    rho("convert-hf", d / "base", d / "hf", "--dtype", "fp32")
    return d, config, records


def training_samples(d, pg_dir, separate: bool, whole: bool = False, samples: int = 8, seq: int = SEQ,
                     heldout: bool = False):
    """The first ``samples`` training samples as a 2-step run reads them (GPTDataset's indices, the
    run's data spec); the first 8 are step 1's global batch. ``heldout``: the validation samples of a
    run with ``--eval-data heldout --eval-mask heldout.mask`` instead."""
    import torch.distributed as dist

    from parallel.data import DataSpec, TokenIds, build_datasets

    evals = dict(eval_prefixes=(str(d / "heldout"),), eval_masks=(str(d / "heldout.mask"),)) if heldout else {}
    spec = DataSpec(prefixes=(str(d / "tora"),), weights=None, seq_length=seq, seed=1234, split="90,10,0",
                    token_ids=TokenIds(vocab_size=32000, eod=2), cache_dir=None, masks=(str(d / "tora.mask"),),
                    separate_documents=separate, whole_documents=whole, **evals)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{pg_dir / 'pg'}", rank=0, world_size=1)
    try:
        train, valid = build_datasets(spec, max(2 * 8, samples), 2 * 8)
        return [(valid if heldout else train)[i] for i in range(samples)]
    finally:
        dist.destroy_process_group()


def hand_loss(hf, samples, separate: bool) -> float:
    """Mean PyTorch cross-entropy over the kept labels; each packed example alone when ``separate``."""
    import torch
    import torch.nn.functional as F

    total, kept = 0.0, 0
    with torch.no_grad():
        for s in samples:
            tokens, labels, keep = s["tokens"], s["labels"], s["loss_mask"] > 0
            ends = (tokens == 2).nonzero().flatten().tolist() if separate else []
            cuts = [0] + [e + 1 for e in ends if e + 1 < len(tokens)] + [len(tokens)]
            for a, b in zip(cuts, cuts[1:]):
                logits = hf(tokens[a:b][None]).logits[0].double()  # positions 0.. of this piece
                ce = F.cross_entropy(logits, labels[a:b], reduction="none")
                total += float(ce[keep[a:b]].sum())
                kept += int(keep[a:b].sum())
    return total / kept


@pytest.mark.slow
def test_masked_loss_is_the_hand_loss_packed_apart_and_together(sft, tmp_path, llama2_sp):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    d, config, records = sft
    common = ("--data", d / "tora", "--mask", d / "tora.mask", "--init", d / "base", "--steps", 2,
              "--seq-length", SEQ, "-q")
    # at TP2PP2: every pipeline stage must read the document mask (its own layers' attention)
    rho("train", config, *common, "--save", tmp_path / "apart", "--separate-documents", "--tp", 2, "--pp", 2)
    rho("train", config, *common, "--save", tmp_path / "whole", "--separate-documents", "--pack", "whole")
    hf = AutoModelForCausalLM.from_pretrained(str(d / "hf"), dtype="float32").eval()
    apart, together = training_samples(d, tmp_path, True), training_samples(d, tmp_path, False)
    whole = training_samples(d, tmp_path, True, whole=True)
    for a, t in zip(apart, together):  # the same tokens and kept labels; only the attention differs
        assert (a["tokens"] == t["tokens"]).all() and (a["loss_mask"] == t["loss_mask"]).all()
        assert a["attention_mask"].shape == (1, SEQ, SEQ) and "attention_mask" not in t
    want_apart, want_together = hand_loss(hf, apart, True), hand_loss(hf, together, False)
    # measured: within 3e-8 of its hand loss (a run without the flag: within 2e-8 of the packed hand
    # loss); the two hand losses differ by 1e-4 (a 2-step model leans on context little, and only
    # tokens after a sample's first example boundary can see across it)
    assert losses(tmp_path / "apart")[1] == pytest.approx(want_apart, abs=1e-6)
    assert abs(want_apart - want_together) > 1e-5  # packing without the separation changes the loss
    assert losses(tmp_path / "whole")[1] == pytest.approx(hand_loss(hf, whole, True), abs=1e-6)

    # every kept label is response text: the runs of kept labels, decoded, are found in a response
    sp = spm.SentencePieceProcessor(model_file=str(llama2_sp))
    responses = "\n".join(r["solution"] for r in records)
    runs = 0
    for s in apart:
        keep, labels = (s["loss_mask"] > 0).numpy(), s["labels"].numpy()
        edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(int), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            ids = [int(x) for x in labels[a:b] if x != 2]
            text = sp.decode(ids).strip()
            assert not text or text in responses, text
            assert "```output\n" not in sp.decode(ids) or sp.decode(ids).endswith("```output")
            runs += 1
    assert runs >= 8


def test_eval_mask_validates_on_the_heldout_responses(sft, tmp_path, capsys):
    """--eval-data with --eval-mask: the validation loss is the hand loss of the held-out samples over
    their response tokens (an untrained run, --lr 0, so the exported model is the one validated); a
    mask for other tokens, or one without --eval-data, is one line."""
    import torch
    from transformers import AutoModelForCausalLM

    from rho_cli import run_rho
    from train_utils import valid_losses

    d, config, _ = sft
    common = ("--data", d / "tora", "--mask", d / "tora.mask", "--init", d / "base", "--seq-length", SEQ,
              "--separate-documents", "--set", "train.warmup_steps=0", "-q")
    rho("train", config, *common, "--steps", 1, "--lr", 0, "--set", "train.min_lr=0", "--eval-interval", 1,
        "--eval-data", d / "heldout", "--eval-mask", d / "heldout.mask", "--save", tmp_path / "run")
    hf = AutoModelForCausalLM.from_pretrained(str(d / "hf"), dtype="float32").eval()
    samples = training_samples(d, tmp_path, True, samples=2 * 8, heldout=True)  # eval_iters 2 x 8 sequences
    want = hand_loss(hf, samples, True)
    every = hand_loss(hf, [{**s, "loss_mask": torch.ones_like(s["loss_mask"])} for s in samples], True)
    assert valid_losses(tmp_path / "run")[0] == pytest.approx(want, abs=1e-6) and abs(want - every) > 1e-3

    bad = run_rho(capsys, "train", config, *common, "--steps", 1, "--eval-data", d / "heldout",
                  "--eval-mask", d / "tora.mask", "--save", tmp_path / "bad")
    assert bad.exit_code == 6 and "--eval-mask" in bad.stderr and "--eval-data" in bad.stderr, bad.stderr
    alone = run_rho(capsys, "train", config, *common, "--steps", 1, "--eval-mask", d / "heldout.mask",
                    "--save", tmp_path / "bad")
    assert alone.exit_code == 2 and "--eval-mask needs --eval-data" in alone.stderr, alone.stderr


def test_epochs_set_the_steps(sft, tmp_path, capsys):
    from rho_cli import run_rho
    from rhocli.core.formats.tokens import TokenDataset

    d, config, _ = sft
    r = run_rho(capsys, "train", config, "--data", d / "tora", "--save", tmp_path / "r", "--epochs", "1.5",
                "--seq-length", SEQ, "--dry-run")
    assert r.exit_code == 0, r.stderr
    want = int(np.ceil(1.5 * TokenDataset(d / "tora").num_tokens / (SEQ * 8)))
    assert re.search(rf"steps\s+│ {want} \({want * SEQ * 8:,} tokens\)", r.stdout), r.stdout
    r = run_rho(capsys, "train", config, "--data", d / "tora", "--save", tmp_path / "r", "--epochs", "1", "--steps", "3")
    assert r.exit_code == 2 and "--epochs and --steps exclude each other" in r.stderr


def test_pack_whole_puts_whole_examples_in_each_sample(sft, tmp_path):
    """--pack whole: every sample is whole examples (each piece between EODs is a complete document of
    the dataset, from its first token), then padding with no label trained; one pass covers every
    training example."""
    from rhocli.core.formats.tokens import TokenDataset

    d, _, _ = sft
    ds = TokenDataset(d / "tora")
    documents = {tuple(ds.document(i).tolist()) for i in range(ds.num_documents)}
    seq = 700  # longer than every example here (a longer one would be cut, as GPTDataset cuts)
    assert max(map(len, documents)) < seq
    samples = training_samples(d, tmp_path, True, whole=True, samples=40, seq=seq)
    seen = set()
    for s in samples:
        tokens, keep, labels = s["tokens"].tolist(), s["loss_mask"] > 0, s["labels"]
        ends = [i for i, t in enumerate(tokens) if t == 2]
        assert ends, "a sample without a whole example"
        start = 0
        for end in ends:
            piece = tuple(tokens[start:end + 1])
            assert piece in documents, (start, end)
            seen.add(piece)
            start = end + 1
        assert not keep[start:].any() and (labels[start:] == 0).all()  # padding: nothing trained
    # 40 samples of 700 tokens hold about two passes over the training split's ~43 examples
    assert len(seen) >= 0.9 * 0.9 * ds.num_documents
