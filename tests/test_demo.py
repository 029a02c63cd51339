"""`rho demo`: the generator's labels are true (checked by re-doing the arithmetic), token kinds follow
the text, and the whole pipeline runs end to end through the real commands at the tiny size."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from rhocli.demo import corpus as gen
from rho_cli import run_rho
from train_utils import rho

_CALC = re.compile(r"(\d+) ([-+*]) (\d+) = $")


def _calculations(doc: gen.Document):
    """(a, op, b, shown result, kind of the result span) for every 'a op b = r' in the document."""
    spans = doc.spans
    for i in range(1, len(spans)):
        m = _CALC.search(spans[i - 1][0])
        if m and spans[i][0].isdigit() or (m and spans[i][0].lstrip("-").isdigit()):
            yield int(m.group(1)), m.group(2), int(m.group(3)), int(spans[i][0]), spans[i][1]


def _true(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_clean_documents_have_correct_solutions():
    docs = list(gen.clean_documents(400, seed=5))
    calcs = [c for d in docs for c in _calculations(d)]
    assert len(calcs) >= 400
    for a, op, b, shown, kind in calcs:
        assert kind == "result" and shown == _true(a, op, b), (a, op, b, shown)
    for d in docs:
        kinds = {k for _, k in d.spans}
        assert kinds <= {"text", "result", "answer"}
        # the final answer repeats the last result
        results = [s for s, k in d.spans if k == "result"]
        answers = [s for s, k in d.spans if k == "answer"]
        assert answers and answers[-1] == results[-1]


def test_noisy_documents_label_wrong_results_and_noise():
    docs = list(gen.noisy_documents(600, seed=6))
    calcs = [c for d in docs for c in _calculations(d)]
    wrong = [c for c in calcs if c[4] == "wrong"]
    assert wrong and all(shown != _true(a, op, b) for a, op, b, shown, _ in wrong)
    assert all(shown == _true(a, op, b) for a, op, b, shown, kind in calcs if kind == "result")
    kinds = {k for d in docs for _, k in d.spans}
    assert kinds == set(gen.KINDS)
    # a wrong final answer never equals the last result shown before it
    for d in docs:
        nums = [(s, k) for s, k in d.spans if k in ("result", "answer", "wrong")]
        if nums and nums[-1][1] == "wrong" and len(nums) > 1 and nums[-2][1] == "result":
            assert nums[-1][0] != nums[-2][0]
    # disjoint seeds give different problems; the same seed gives the same ones
    assert [d.text for d in gen.clean_documents(5, 1)] == [d.text for d in gen.clean_documents(5, 1)]
    assert [d.text for d in gen.clean_documents(5, 1)] != [d.text for d in gen.clean_documents(5, 2)]


def test_token_kinds_follow_the_text(tmp_path):
    import sentencepiece as spm

    from rhocli.demo.labels import LabelMismatch, token_kinds
    from rhocli.demo.pipeline import train_sentencepiece

    docs = list(gen.noisy_documents(300, seed=7))
    train_sentencepiece([d.text for d in docs], tmp_path / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    stored = [np.asarray(sp.encode(d.text) + [sp.eos_id()]) for d in docs]
    kinds = token_kinds(str(tmp_path / "tok.model"), docs, stored)
    for doc, ids, k in zip(docs, stored, kinds):
        assert len(k) == len(ids)
        for kind_index, kind in enumerate(gen.KINDS):
            if kind in ("text",):
                continue
            # the tokens labelled `kind` spell exactly the document's `kind` spans (spaces aside)
            got = "".join(sp.id_to_piece(int(t)) for t, x in zip(ids[:-1], k[:-1]) if x == kind_index).replace("\u2581", "")
            want = "".join(s for s, kk in doc.spans if kk == kind).replace(" ", "").replace("\n", "")
            assert got.replace("\n", "") == want, (kind, doc.text)
    with pytest.raises(LabelMismatch):
        token_kinds(str(tmp_path / "tok.model"), docs[:1], [stored[1]])


@pytest.mark.slow
def test_demo_tiny_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    proc = rho("demo", "--output", out, "--size", "tiny", timeout=600)
    assert "Everything is under" in proc.stdout and str(out) in proc.stdout
    results = json.loads((out / "results.json").read_text())
    for run in ("reference", "clm", "slm"):
        assert (out / "runs" / run / "metrics.jsonl").is_file()
        assert np.isfinite(results["heldout"][run]["all"])
    # training lowered the held-out loss from the initial weights' (ln 512 ≈ 6.24)
    for run in ("clm", "slm"):
        valid = results["curves"][run]["valid"]
        assert valid[0][0] == 0 and valid[-1][1] < valid[0][1] - 1.0
    # SLM trained on the requested fraction of tokens at every step
    kept = results["curves"]["slm"]["kept_fraction"]
    assert kept and all(abs(k - 0.6) < 0.01 for k in kept)
    # the selection rule keeps clean text more often than boilerplate (Rho-1's point, even this small)
    by_kind = results["kept_by_kind"]
    assert by_kind["text"]["kept"] > by_kind["boilerplate"]["kept"]
    # accuracy: rho eval graded CLM's and SLM's greedy answers; ground truth here is the generator's own
    # answer spans, and an answer is right when its last number is the right result
    from rhocli.demo.corpus import read_kinds

    answers = [text for doc in read_kinds(out / "data" / "heldout.kinds.jsonl") for text, kind in doc.spans if kind == "answer"]
    for run in ("clm", "slm"):
        lines = [json.loads(line) for line in (out / "evals" / run / "outputs.jsonl").read_text().splitlines()]
        assert len(lines) == results["accuracy"][run]["problems"] == 24
        assert [r["gt"] for r in lines] == answers[:24]
        right = [bool(re.findall(r"-?\d+", r["code"][0])) and re.findall(r"-?\d+", r["code"][0])[-1] == a
                 for r, a in zip(lines, answers)]
        assert results["accuracy"][run]["acc"] == round(100 * sum(right) / 24, 1)
    report = (out / "report.html").read_text()
    assert "<svg" in report and "Held-out loss" in report and "Question" in report and "Held-out accuracy" in report
    assert (out / "select" / "tokens.html").is_file()
    # everything it wrote is under --output; a second run refuses to overwrite it
    again = run_rho(capsys, "demo", "--output", out, "--size", "tiny")  # refused before it starts: in-process
    assert again.exit_code == 5 and "--force" in again.stderr and (out / "results.json").is_file()
