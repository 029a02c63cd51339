"""``rho eval`` end to end: greedy generation equals transformers' own ``generate`` (from a HF directory
and from a rho TP2PP2 checkpoint), the ToRA loop replays the released Rho-Math-interpreter trajectories,
the command writes the harness's files, resumes after Ctrl-C, and refuses bad input in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import GSM8K, LLAMA2_SP, SHARED, write_jsonl
from rho_cli import run_rho
from rhocli.eval.generation import Completion, TransformersGenerator

PROMPTS = ["Natalia sold 48 clips", "The European lobster is a species of", "She sold 48 / 2 = 24 clips in May, so",
           "Weng earns $12 an hour"]
NEW_TOKENS = 12


def _transformers_greedy(model_dir, prompts, new_tokens):
    """Ground truth: transformers' generate, one prompt at a time (no padding), greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        out.append((gen[0, ids.input_ids.shape[1]:].tolist(), tok))
    return out


@pytest.mark.slow
def test_greedy_generation_equals_transformers(tmp_path, llama_tp2pp2):
    """Batched (left-padded) generation from the HF directory and from the rho TP2PP2 checkpoint
    (exported on the fly, as rho eval does) gives transformers' unbatched greedy tokens, token for
    token; a stop string cuts the text where transformers' text has it."""
    from rhocli.convert.hf import export_hf
    from rhocli.eval.model import hf_model_dir

    expected = _transformers_greedy(llama_tp2pp2.hf_dir, PROMPTS, NEW_TOKENS)
    tok = expected[0][1]
    want = [tokens for tokens, _ in expected]
    assert len({len(t) for t in want}) >= 1 and all(want)

    from_hf = TransformersGenerator(llama_tp2pp2.hf_dir, "cpu", batch_size=3).generate(PROMPTS, (), NEW_TOKENS)
    assert [c.tokens for c in from_hf] == want
    with hf_model_dir(str(llama_tp2pp2.tp2pp2), tmp_path, export_hf, "fp32", str(llama_tp2pp2.hf_dir)) as model_dir:
        assert model_dir != llama_tp2pp2.hf_dir and (model_dir / "tokenizer.json").is_file()
        generator = TransformersGenerator(model_dir, "cpu", batch_size=3)
        from_rho = generator.generate(PROMPTS, (), NEW_TOKENS)
        assert [c.tokens for c in from_rho] == want
        # a stop string taken from the middle of the first generation
        full = tok.decode(want[0], skip_special_tokens=True)
        stop = full[len(full) // 2: len(full) // 2 + 3]
        assert stop.strip(), full
        cut = generator.generate(PROMPTS[:1], (stop,), NEW_TOKENS)[0]
        assert cut.text == full[: full.find(stop)]
    assert not (tmp_path / ".rho-model").exists()  # the temporary export is removed


class ReplayGenerator:
    """Plays back the released generations of a ToRA model round by round: round k returns the text the
    model wrote between its k-th and (k+1)-th ```output block. The loop under test executes the
    programs and appends their outputs itself."""

    def __init__(self, generations: dict[str, str]):
        import re

        self.pieces = {q: re.split(r"\n```output\n.*?\n```\n", g, flags=re.S) for q, g in generations.items()}

    def generate(self, prompts, stop, max_new_tokens):
        out = []
        for prompt in prompts:
            question = prompt.split("<|user|>\n", 1)[1].split("\n<|assistant|>\n", 1)[0]
            round_ = prompt.count("```output")
            pieces = self.pieces[question]
            out.append(Completion(pieces[round_] if round_ < len(pieces) else "", []))
        return out


@pytest.mark.slow
def test_tora_loop_replays_the_released_trajectories(tmp_path, program_isolation):
    """The ToRA loop (prompt, stop at ```output, run the program in the sandbox, append its output,
    continue, at most 4 programs) rebuilds the released Rho-Math-7B-interpreter generations from the
    model's own words: the whole text equals the harness's ``code`` for >= 90 % of the problems (the
    rest differ in a program's output: the harness words a timeout differently, library versions),
    and the verdicts are the harness's. The problems: the first 40 and every one with 2 to 4 programs."""
    from rhocli.core.formats.eval_outputs import read_outputs
    from rhocli.eval.run import EvalJob, run_eval
    from rhocli.eval.sandbox import Limits, Sandbox
    from rhocli.eval.tasks import Problem, load_prompt, reference_of

    path = SHARED / "evals/rho-math-outputs/rho-math-7b-interpreter-v0.1/minerva_math/test_tora_-1_seed0_t0.0_s0_e-1.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    everything = read_outputs(path)
    released = everything[:40] + [r for r in everything[40:] if r["code"][0].count("```output") >= 2]
    problems = [Problem(r["idx"], r["question"], reference_of(r, "math"), {"level": r["level"]}) for r in released]
    job = EvalJob(problems, load_prompt("math", "tora"), tmp_path / "out", 1024, 8, {"test": "replay"})
    with Sandbox(Limits(wall_s=5.0, cpu_s=6, memory_mb=1024), workers=2) as sandbox:
        metrics = run_eval(job, ReplayGenerator({r["question"]: r["code"][0] for r in released}), sandbox)
    rebuilt = {r["idx"]: r for r in read_outputs(tmp_path / "out" / "outputs.jsonl")}
    same = [r for r in released if rebuilt[r["idx"]]["code"][0] == r["code"][0]]
    differ = [r["idx"] for r in released if rebuilt[r["idx"]]["code"][0] != r["code"][0]]
    print(f"rebuilt exactly: {len(same)}/{len(released)}; differ: {differ}")
    assert len(same) >= 0.9 * len(released)
    multi = [r for r in same if r["code"][0].count("```output") >= 2]
    assert len(multi) >= 8, f"only {len(multi)} problems with several programs rebuilt"
    assert any("Reach max function call limit." in r["code"][0] for r in same)
    verdicts = sum(bool(rebuilt[r["idx"]]["score"][0]) == bool(r["score"][0]) for r in released)
    assert verdicts >= 0.95 * len(released)
    assert metrics["num_samples"] == len(released)


def _problems_file(path, n, start=7000):
    """GSM8K train problems the tiny model did not train on (it trains on the first few hundred)."""
    lines = GSM8K.read_text().splitlines()[start:start + n]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def gsm8k_model(tmp_path_factory):
    """A tiny rho model trained on GSM8K train (tokenized with the Llama-2 tokenizer)."""
    if not (GSM8K.is_file() and LLAMA2_SP.is_file()):
        pytest.skip("../shared (GSM8K, the Llama-2 tokenizer) is absent")
    from train_utils import rho, write_tiny_config

    d = tmp_path_factory.mktemp("gsm8k_model")
    docs = [json.loads(line) for line in GSM8K.read_text().splitlines()[:400]]
    write_jsonl(d / "train.jsonl", [{"text": f"Question: {r['question']}\nAnswer: {r['answer']}"} for r in docs])
    rho("tokenize", d / "train.jsonl", "-t", LLAMA2_SP, "-o", d / "tokens", "-w", "1")
    config = write_tiny_config(d, "")
    rho("train", config, "--data", d / "tokens", "--save", d / "run", "--steps", 4, "--set", "model.max_position_embeddings=2048", "-q")
    return d / "run"


@pytest.mark.slow
def test_eval_command_end_to_end(tmp_path, gsm8k_model, capsys):
    """``rho eval`` of the tiny GSM8K model, 2-shot chain of thought, 3 problems: outputs.jsonl in the
    harness's schema (verdicts that re-grading the file reproduces), metrics.json, the summary; the
    same command again resumes with nothing to do; other settings in the same directory are refused."""
    data = _problems_file(tmp_path / "test.jsonl", 3)
    out = tmp_path / "eval"
    args = ["eval", gsm8k_model, "--task", "gsm8k", "--data", data, "--prompt", "cot", "--shots", 2,
            "--max-new-tokens", 16, "--batch-size", 2, "--output", out, "--device", "cpu"]
    r = run_rho(capsys, *args)
    assert r.exit_code == 0, r.stderr
    assert "accuracy" in r.stdout and "outputs.jsonl" in r.stdout
    records = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert [rec["idx"] for rec in records] == [0, 1, 2]
    for rec in records:
        assert {"idx", "question", "gt", "code", "pred", "report", "score"} <= set(rec)
        assert len(rec["code"]) == len(rec["pred"]) == len(rec["score"]) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 3 and metrics["settings"]["shots"] == 2
    assert metrics["acc"] == round(100 * sum(rec["score"][0] for rec in records) / 3, 1)
    assert not (out / ".rho-model").exists()

    again = run_rho(capsys, *args)
    assert again.exit_code == 0 and "3 already in the output" in again.stdout
    assert (out / "outputs.jsonl").read_text().count("\n") == 3

    other = run_rho(capsys, *args[:-4], "--shots", 1, "--output", out, "--device", "cpu")
    assert other.exit_code == 5 and "holds an eval with other settings (shots" in other.stderr

    regraded = run_rho(capsys, "eval", "--regrade", out / "outputs.jsonl", "--task", "gsm8k")
    assert regraded.exit_code == 0 and "agreement with the file's own scores: 100.0 %" in regraded.stdout


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_eval(tmp_path, gsm8k_model):
    """SIGINT during an eval: exit 130 with one line; outputs.jsonl holds whole lines only; the same
    command finishes the rest, and every problem is there once."""
    data = _problems_file(tmp_path / "test.jsonl", 8)
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "rhocli", "eval", str(gsm8k_model), "--task", "gsm8k", "--data", str(data),
           "--shots", "1", "--max-new-tokens", "24", "--batch-size", "1", "--output", str(out), "--device", "cpu", "-q"]
    # SIGINT as a terminal delivers it: a suite started in the background by a non-interactive shell
    # (nohup CMD &) hands its children SIGINT ignored, and Python then installs no handler (CI got exit 0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    outputs = out / "outputs.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (outputs.is_file() and outputs.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    partial = outputs.read_text().splitlines()
    assert 2 <= len(partial) < 8
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert sorted(r["idx"] for r in records) == list(range(8))
    assert [json.loads(line) for line in partial] == records[: len(partial)]


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path, gsm8k_model, llama_tp2pp2, capsys):
    """Missing key, empty file, unknown prompt, a model without a tokenizer, no model: one line each,
    a non-zero exit code, nothing written."""
    import shutil

    from train_utils import rho

    good = _problems_file(tmp_path / "good.jsonl", 1)
    # a checkpoint imported from a HF directory that has no tokenizer: none to export with it
    bare = tmp_path / "bare_hf"
    shutil.copytree(llama_tp2pp2.hf_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    rho("convert-hf", "--from-hf", bare, tmp_path / "bare")
    base = ["--task", "gsm8k", "--max-new-tokens", 4, "--device", "cpu"]
    (tmp_path / "keys.jsonl").write_text(json.dumps({"q": "What?", "answer": "#### 4"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        (["eval", gsm8k_model, "--data", tmp_path / "keys.jsonl", *base, "-o", tmp_path / "o1"], 4,
         "keys.jsonl:1: no 'question' field (pass --question-key)"),
        (["eval", gsm8k_model, "--data", tmp_path / "empty.jsonl", *base, "-o", tmp_path / "o2"], 4,
         "empty.jsonl: no problems"),
        (["eval", gsm8k_model, "--data", good, "--prompt", "socratic", *base, "-o", tmp_path / "o3"], 2,
         "--prompt: expected one of"),
        (["eval", tmp_path / "bare", "--data", good, *base, "-o", tmp_path / "o4"], 3,
         "no tokenizer found for this checkpoint (pass --tokenizer FILE)"),
        (["eval", tmp_path / "nothing", "--data", good, *base, "-o", tmp_path / "o5"], 3, "not found"),
        (["eval", "--data", good, *base, "-o", tmp_path / "o6"], 2, "MODEL: missing"),
    ]
    for argv, code, message in cases:
        r = run_rho(capsys, *argv)
        assert r.exit_code == code and message in r.stderr, (argv, r.exit_code, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    for name in ("o1", "o2", "o3", "o5", "o6"):
        assert not (tmp_path / name).exists()
    assert not (tmp_path / "o4" / "outputs.jsonl").exists() and not (tmp_path / "o4" / ".rho-model").exists()


def test_a_row_padded_with_eos_after_a_stop_string_ends_at_the_stop():
    """Batched generation pads a row that stopped at a stop string; with EOS as the padding id the
    first padding token looks generated. The row ends where its text first holds the stop string;
    a real EOS (no stop string before it) and rows without EOS padding are kept as they are."""
    from rhocli.eval.generation import _until_end

    words = {1: "x = 2", 2: "\n", 3: "```output", 4: " more", 0: ""}  # 0: EOS
    decode = lambda ids: "".join(words[i] for i in ids if i != 0)
    stop = ("```output",)
    assert _until_end([1, 2, 3, 0, 0, 0], 0, 0, stop, decode) == [1, 2, 3]  # stopped at the stop string
    assert _until_end([1, 2, 0, 0, 0], 0, 0, stop, decode) == [1, 2, 0]  # the model's own EOS
    assert _until_end([1, 2, 4, 4], 0, 0, stop, decode) == [1, 2, 4, 4]  # ran to max_new_tokens
    assert _until_end([1, 2, 3, 9, 9], 0, 9, stop, decode) == [1, 2, 3]  # a pad token of its own
