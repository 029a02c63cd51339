"""rho select: offline masks against an independent numpy selection, read back with megatron's own
IndexedDataset; the HTML report rendered by a real headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, write_jsonl
from rho_cli import run_rho
from store_utils import write_score_store


@pytest.fixture()
def scored(tmp_path, hf_tokenizer_dir, capsys):
    from rhocli.core.formats.tokens import TokenDataset

    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS[:30]])
    assert run_rho(capsys, "tokenize", tmp_path / "c.jsonl", "-t", hf_tokenizer_dir, "-o", tmp_path / "c", "-w", "1").exit_code == 0
    ds = TokenDataset(tmp_path / "c")
    lengths = ds.document_lengths()
    rng = np.random.default_rng(0)
    ref = [rng.random(n).astype(np.float32) * 5 for n in lengths]
    base = [r + rng.normal(0, 1, len(r)).astype(np.float32) for r in ref]
    # document 0: four exact ties in excess straddling the 60 % boundary, so the lower index must win.
    # Every value is a multiple of 1/4 (exact in float32, and so is base - ref): k - 2 tokens far
    # above the tie, the tied four, the rest far below.
    n0 = len(ref[0])
    k0 = int(np.floor(0.6 * n0 + 0.5))
    assert 4 + (k0 - 2) <= n0 and k0 >= 2
    ref[0] = (np.round(ref[0] * 4) / 4).astype(np.float32)
    excess0 = np.full(n0, -10.0, dtype=np.float32)
    excess0[:4] = 2.0
    excess0[4:4 + k0 - 2] = 10.0
    base[0] = ref[0] + excess0
    assert np.array_equal(base[0] - ref[0], excess0)
    write_score_store(tmp_path / "ref", tmp_path / "c", ref, ds.fingerprint())
    write_score_store(tmp_path / "base", tmp_path / "c", base, ds.fingerprint())
    return tmp_path, ds, ref, base


def _mask(prefix: Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].astype(bool).copy() for i in range(len(ds))]


def _expected_top(values: np.ndarray, ratio: float) -> np.ndarray:
    k = int(np.floor(ratio * values.size + 0.5))
    order = sorted(range(values.size), key=lambda i: (-values[i], i))  # independent of rho's code
    out = np.zeros(values.size, dtype=bool)
    out[order[:k]] = True
    return out


def test_excess_per_document(scored, capsys):
    d, ds, ref, base = scored
    r = run_rho(capsys, "select", "--scores", d / "ref", "--base-scores", d / "base", "--ratio", "0.6",
                "--output", d / "m")
    assert r.exit_code == 0, r.stderr
    got = _mask(d / "m")
    assert len(got) == ds.num_documents
    for i, (b, rf) in enumerate(zip(base, ref)):
        assert np.array_equal(got[i], _expected_top(b.astype(np.float64) - rf, 0.6)), i
    assert got[0][:4].tolist() == [True, True, False, False]  # the tie at the boundary: lower index first
    manifest = json.loads((d / "m.json").read_text())
    assert manifest["format"] == "rho.mask" and manifest["kept"] == sum(int(m.sum()) for m in got)


def test_reference_global(scored, capsys):
    d, ds, ref, _ = scored
    r = run_rho(capsys, "select", "--scores", d / "ref", "--score", "reference", "--scope", "global",
                "--ratio", "0.25", "--output", d / "g")
    assert r.exit_code == 0, r.stderr
    got = np.concatenate(_mask(d / "g"))
    assert np.array_equal(got, _expected_top(-np.concatenate(ref).astype(np.float64), 0.25))


def test_document_filter_keeps_whole_documents_by_mean_score(scored, capsys):
    d, ds, ref, base = scored
    r = run_rho(capsys, "select", "--scores", d / "ref", "--base-scores", d / "base", "--scope", "filter",
                "--ratio", "0.5", "--output", d / "f")
    assert r.exit_code == 0, r.stderr
    got = _mask(d / "f")
    # independent greedy: documents by mean excess (float64), best first, while within k tokens
    total = sum(len(v) for v in ref)
    k = int(np.floor(0.5 * total + 0.5))
    means = [float(np.mean(b.astype(np.float64) - rf)) for b, rf in zip(base, ref)]
    kept, used = set(), 0
    for i in sorted(range(len(means)), key=lambda i: (-means[i], i)):
        if used + len(ref[i]) <= k:
            kept.add(i)
            used += len(ref[i])
    for i, m in enumerate(got):
        assert m.all() if i in kept else not m.any(), i
    assert 0 < used <= k and json.loads((d / "f.json").read_text())["kept"] == used


def test_bad_inputs(scored, capsys, tmp_path):
    d, ds, ref, base = scored
    r = run_rho(capsys, "select", "--scores", d / "ref", "--ratio", "0.5", "--output", d / "x")
    assert r.exit_code == 2 and "--base-scores" in r.stderr
    write_score_store(d / "other", d / "c", base, "sha256:someone-else")
    r = run_rho(capsys, "select", "--scores", d / "ref", "--base-scores", d / "other", "--ratio", "0.5", "--output", d / "x")
    assert r.exit_code == 6 and "scores other tokens" in r.stderr
    r = run_rho(capsys, "select", "--scores", d / "nope", "--score", "reference", "--output", d / "x")
    assert r.exit_code == 3
    assert run_rho(capsys, "select", "--scores", d / "ref", "--score", "reference", "--output", d / "x").exit_code == 0
    r = run_rho(capsys, "select", "--scores", d / "ref", "--score", "reference", "--output", d / "x")
    assert r.exit_code == 5


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(scored, capsys):
    from rhocli.core.tokenizers import load_tokenizer

    d, ds, ref, base = scored
    r = run_rho(capsys, "select", "--scores", d / "ref", "--base-scores", d / "base", "--ratio", "0.5",
                "--output", d / "m", "--report", d / "report.html", "--report-documents", "3")
    assert r.exit_code == 0, r.stderr
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={d / 'chrome'}", "--dump-dom",
         (d / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    dom = proc.stdout
    assert "<h1>rho select: excess top 50% per document</h1>" in dom, proc.stderr[-2000:]
    # the first document's tokens appear in order, one span each, and read as the tokenizer decodes them
    import html
    import re

    tok = load_tokenizer(json.loads((d / "c.json").read_text())["tokenizer"]["path"])
    first_section = dom.split('<section class="doc">')[1]
    spans = re.findall(r'<span class="[kd]"[^>]*>(.*?)</span>', first_section)
    ids = ds.document(0).tolist()
    assert len(spans) == len(ids)
    text = "".join(html.unescape(s) for s in spans)
    assert text.startswith(tok.decode(ids[:-1]))  # the last token is the end-of-document marker
    sections = "".join(dom.split('<section class="doc">')[1:])
    all_spans = re.findall(r'<span class="([kd])"', sections)
    assert len(all_spans) == int(sum(ds.document_lengths()[:3]))
    assert "k" in all_spans and "d" in all_spans and "<svg" in dom


def test_a_score_store_of_other_documents_is_refused(scored, capsys, tmp_path):
    """A store that claims the token dataset's fingerprint but scores fewer documents is refused by
    rho train before anything runs (it used to fail mid-run with an IndexError)."""
    from train_utils import write_tiny_config

    d, ds, ref, _ = scored
    write_score_store(d / "part", d / "c", ref[:20], ds.fingerprint())
    config = write_tiny_config(tmp_path)
    r = run_rho(capsys, "train", config, "--data", d / "c", "--scores", d / "part", "--select-ratio", "0.6",
                "--save", tmp_path / "run", "--dry-run")
    assert r.exit_code == 6 and "20 documents" in r.stderr and f"has {len(ref)} documents" in r.stderr, r.stderr


def test_an_existing_report_refuses_before_the_mask_is_written(scored, capsys):
    d, ds, ref, base = scored
    (d / "r.html").write_text("mine")
    r = run_rho(capsys, "select", "--scores", d / "ref", "--score", "reference", "--ratio", "0.5", "--output", d / "new",
                "--report", d / "r.html")
    assert r.exit_code == 5 and "r.html" in r.stderr
    assert not (d / "new.json").exists() and (d / "r.html").read_text() == "mine"
