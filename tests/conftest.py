"""Shared fixtures. Tests that need ../shared (real data, the Llama-2 tokenizer) skip when it is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
LLAMA2_SP = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
WIKITEXT_VALID = SHARED / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="session")
def llama2_sp() -> Path:
    if not LLAMA2_SP.is_file():
        pytest.skip("../shared/tokenizers/llama2/tokenizer.model is absent")
    return LLAMA2_SP


@pytest.fixture(scope="session")
def gsm8k() -> Path:
    if not GSM8K.is_file():
        pytest.skip("../shared/data/gsm8k is absent")
    return GSM8K


# A small corpus the project owns, so tokenizer tests do not depend on ../shared.
CORPUS = [
    "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
    "She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 clips in total.",
    "The European lobster is a species of clawed lobster from the eastern Atlantic Ocean.",
    "Unicode survives tokenization: café, naïve, 東京, emoji 🙂 and tabs\tand spaces.",
    "Weng earns $12 an hour for babysitting; 50 minutes earns her 0.2 x 50 = $10.",
    "A second line\nwith an embedded newline and    runs of spaces.",
] * 20


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A HF fast tokenizer (byte-level BPE) trained here on CORPUS, saved as a tokenizer directory."""
    from hf_models import write_bpe_tokenizer

    return write_bpe_tokenizer(tmp_path_factory.mktemp("hf_tok"), CORPUS, 400, eos="<|endoftext|>", bos="<|begin|>")


def _tokenized(tmp_path_factory, tokenizer_dir: Path, name: str, texts: list[str]) -> Path:
    from rhocli.tokenize.pipeline import TokenizeConfig, run_tokenize

    d = tmp_path_factory.mktemp(name)
    write_jsonl(d / "corpus.jsonl", [{"text": t} for t in texts])
    run_tokenize(TokenizeConfig(inputs=(str(d / "corpus.jsonl"),), tokenizer=str(tokenizer_dir), output=str(d / "corpus"), workers=1))
    return d / "corpus"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, hf_tokenizer_dir) -> Path:
    """CORPUS (a few dozen documents) tokenized with the 400-token BPE tokenizer: for refusals and
    dry runs, which read the data but train nothing."""
    return _tokenized(tmp_path_factory, hf_tokenizer_dir, "small_data", list(CORPUS))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, hf_tokenizer_dir) -> Path:
    """~3,000 short documents tokenized with the 400-token BPE tokenizer: enough for training runs."""
    texts = [f"{i} {CORPUS[i % len(CORPUS)]} {CORPUS[(i * 7) % len(CORPUS)]}" for i in range(3000)]
    return _tokenized(tmp_path_factory, hf_tokenizer_dir, "tiny_data", texts)


@pytest.fixture(scope="session")
def program_isolation():
    """The OS isolation rho eval runs generated programs under (bubblewrap); the tests that run
    programs skip where the machine has none (.ci/run installs bubblewrap)."""
    from rhocli.eval.isolation import _probe

    isolation, why = _probe()
    if isolation is None:
        pytest.skip(f"generated programs need OS isolation, which this machine lacks ({why})")
    return isolation


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """A test that fails while a background ``rho`` runs (``--steps 100000`` held for a signal) must
    not leave it training into the next tests: every process the test started and left is killed."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    left = [p for p in me.children(recursive=True) if p.pid not in before]
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)


@pytest.fixture(scope="session")
def llama_tp2pp2(tmp_path_factory, hf_tokenizer_dir):
    """A tiny random Llama built by transformers (``hf_dir``), imported with ``rho convert-hf --from-hf``
    (``ckpt``) and saved by ``rho train --tp 2 --pp 2 --lr 0`` (``tp2pp2``: a TP2PP2 checkpoint of
    exactly the HF weights), with the token data (``data``), config and shape flags that trained it.
    Shared by the HF round trip (test_hf.py) and rho eval's generation parity (test_eval.py)."""
    import types

    from hf_models import tiny_hf_model
    from train_utils import rho, write_tiny_config

    d = tmp_path_factory.mktemp("llama_tp2pp2")
    hf_dir = d / "hf"
    tiny_hf_model("llama", hf_dir, hf_tokenizer_dir)
    write_jsonl(d / "c.jsonl", [{"text": t} for t in CORPUS * 3])
    rho("tokenize", d / "c.jsonl", "-t", hf_dir, "-o", d / "c", "-w", "1")
    rho("convert-hf", "--from-hf", hf_dir, d / "ckpt")
    config = write_tiny_config(d, "")
    shape = ["--set", "model.num_layers=4", "--set", "model.hidden_size=64", "--set", "model.ffn_hidden_size=160",
             "--set", "model.max_position_embeddings=256", "--set", "model.vocab_size=512"]
    # lr 0: a TP2PP2 checkpoint of exactly the imported weights
    rho("train", config, "--data", d / "c", "--init", d / "ckpt", "--save", d / "tp2pp2",
        "--steps", 2, "--lr", 0, "--set", "train.min_lr=0", "--tp", 2, "--pp", 2, "-q", *shape, timeout=600)
    return types.SimpleNamespace(hf_dir=hf_dir, data=d / "c", ckpt=d / "ckpt", tp2pp2=d / "tp2pp2",
                                 config=config, shape=shape)
