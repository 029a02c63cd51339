"""rho tokenize for instruction data: the mask store PREFIX.mask keeps exactly the response tokens.

Ground truths: for the Llama-2 SentencePiece model, each token's characters are recovered by decoding
growing prefixes of the ids (sentencepiece's decoder, not the offsets rho uses); for a HF tokenizer with
special tokens and its own chat template, transformers renders the template and gives the offsets. The
trained characters are located by the test itself (str.find on the rendered text, a hand scan of the
```output blocks)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import CORPUS
from rhocli.core.corpora import gsm8k_tora, read_jsonl, write_jsonl
from rhocli.core.formats.masks import read_mask_manifest, read_masks
from rhocli.core.formats.tokens import TokenDataset
from rho_cli import run_rho

MULTIBYTE = [  # multi-byte characters inside the prompt, the response and an output block
    {"question": "Un café coûte 3 €. Combien coûtent 4 cafés? 東京 🙂",
     "solution": "4 × 3 € = 12 €.\n```python\nprint(4*3)\n```\n```output\n12 — ✓ 🙂\n```\nLa réponse est $\\boxed{12}$ 🙂"},
    {"question": "naïve → résumé", "solution": "日本語の答え: 5\n```output\n五\n```"},  # an output block at the end
]


@pytest.fixture(scope="module")
def tora_jsonl(tmp_path_factory, gsm8k):
    records = [r for r in (gsm8k_tora(x) for x in read_jsonl(gsm8k)[:60]) if r][:40] + MULTIBYTE
    path = tmp_path_factory.mktemp("tora") / "tora.jsonl"
    write_jsonl(path, records)
    return path, records


def decoded_spans(sp, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Each token's [start, end) in ``text`` from sentencepiece's decoder: the end of token i is the
    length of decode(ids[:i+1]) once that is a prefix of the text (a byte piece that completes no
    character yet ends where the previous token ended)."""
    spans, end = [], 0
    for i in range(len(ids)):
        decoded = sp.decode(ids[: i + 1])
        start = end
        if text.startswith(decoded):
            end = len(decoded)
        spans.append((start, end))
    return spans


def output_bodies(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The interpreter's spans inside [start, end), found by hand: after each ```output up to and
    with the closing ``` (or the end)."""
    out, at = [], start
    while True:
        i = text.find("```output", at, end)
        if i < 0:
            return out
        body = i + len("```output")
        close = text.find("```", body, end)
        stop = end if close < 0 else close + 3
        out.append((body, stop))
        at = stop


def expected_mask(spans, trained, n_chars) -> np.ndarray:
    flags = np.zeros(n_chars + 1, dtype=bool)
    for a, b in trained:
        flags[a:b] = True
    return np.array([flags[s:max(e, s + 1)].any() for s, e in spans])


@pytest.mark.parametrize("mask_spans", [(), ("output",)], ids=["response", "response-without-output"])
def test_response_mask_is_the_response_tokens(tora_jsonl, llama2_sp, tmp_path, capsys, mask_spans):
    import sentencepiece as spm

    path, records = tora_jsonl
    flags = [a for s in mask_spans for a in ("--mask-spans", s)]
    r = run_rho(capsys, "tokenize", path, "-t", llama2_sp, "-o", tmp_path / "d", "-w", "2", "--prompt-key", "question",
                "--response-key", "solution", "--chat-template", "tora", *flags)
    assert r.exit_code == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(llama2_sp))
    ds, masks = TokenDataset(tmp_path / "d"), read_masks(tmp_path / "d.mask")
    assert ds.num_documents == len(records) == len(masks)
    manifest = read_mask_manifest(tmp_path / "d.mask")
    assert manifest["token_dataset"]["fingerprint"] == ds.fingerprint()
    removed = 0
    for i, rec in enumerate(records):
        text = f"<|user|>\n{rec['question']}\n<|assistant|>\n{rec['solution']}"
        ids = ds.document(i).tolist()
        assert ids == sp.encode(text) + [sp.eos_id()]  # the text is tokenized whole, EOD appended
        start = text.index("<|assistant|>\n") + len("<|assistant|>\n")
        trained = [(start, len(text))]
        if mask_spans:
            cut, at = [], start
            for a, b in output_bodies(text, start, len(text)):
                cut.append((at, a))
                at = b
            trained = cut + [(at, len(text))]
            removed += len(output_bodies(text, start, len(text)))
        want = np.append(expected_mask(decoded_spans(sp, ids[:-1], text), trained, len(text)), True)  # EOD trained
        np.testing.assert_array_equal(masks[i], want, err_msg=f"example {i}: {text[:60]!r}")
    assert removed == (len(records) if mask_spans else 0)  # every example has one output block
    assert manifest["kept"] == sum(int(m.sum()) for m in masks)


def test_output_spans_are_removed_and_nothing_else(tora_jsonl, llama2_sp, tmp_path, capsys):
    import sentencepiece as spm

    path, records = tora_jsonl
    common = ("-t", llama2_sp, "-w", "1", "--prompt-key", "question", "--response-key", "solution", "--chat-template", "tora")
    assert run_rho(capsys, "tokenize", path, "-o", tmp_path / "a", *common).exit_code == 0
    assert run_rho(capsys, "tokenize", path, "-o", tmp_path / "b", *common, "--mask-spans", "output").exit_code == 0
    sp = spm.SentencePieceProcessor(model_file=str(llama2_sp))
    ds = TokenDataset(tmp_path / "a")
    assert ds.fingerprint() == TokenDataset(tmp_path / "b").fingerprint()  # same tokens: only the mask differs
    for i, (a, b) in enumerate(zip(read_masks(tmp_path / "a.mask"), read_masks(tmp_path / "b.mask"))):
        rec = records[i]
        text = f"<|user|>\n{rec['question']}\n<|assistant|>\n{rec['solution']}"
        spans = decoded_spans(sp, ds.document(i).tolist()[:-1], text)
        inside = expected_mask(spans, output_bodies(text, 0, len(text)), len(text))
        dropped = np.append(a[:-1] & ~b[:-1], a[-1] != b[-1])
        np.testing.assert_array_equal(dropped[:-1], inside & a[:-1])  # exactly the output tokens went
        assert not dropped[-1] and not (b & ~a).any()
        decoded = sp.decode([t for t, gone in zip(ds.document(i).tolist(), dropped) if gone])
        assert "print" not in decoded and decoded.strip().endswith("```")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory, hf_tokenizer_dir):
    """The byte-level BPE of conftest with three special tokens and its own chat template."""
    from tokenizers import Tokenizer

    out = tmp_path_factory.mktemp("chat_tok")
    tok = Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens(["<|user|>", "<|assistant|>", "<|end|>"])
    tok.save(str(out / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
                "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    config = json.loads((hf_tokenizer_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return out


def test_tokenizer_template_with_special_tokens(chat_tokenizer, tmp_path, capsys):
    from transformers import AutoTokenizer

    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": CORPUS[0]},
         {"role": "assistant", "content": CORPUS[1]}, {"role": "user", "content": "And café? 東京"},
         {"role": "assistant", "content": CORPUS[3]}],
        [{"role": "user", "content": CORPUS[2]}, {"role": "assistant", "content": "🙂 ok"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "no answer"}],
    ]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations])
    r = run_rho(capsys, "tokenize", tmp_path / "chat.jsonl", "-t", chat_tokenizer, "-o", tmp_path / "c", "-w", "1",
                "--messages-key", "messages", "--chat-template", "tokenizer")
    assert r.exit_code == 0, r.stderr
    hf = AutoTokenizer.from_pretrained(str(chat_tokenizer))
    ds, masks = TokenDataset(tmp_path / "c"), read_masks(tmp_path / "c.mask")
    for i, messages in enumerate(conversations):
        text = hf.apply_chat_template(messages, tokenize=False)
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ds.document(i).tolist() == enc["input_ids"] + [hf.eos_token_id]
        assert hf.convert_tokens_to_ids("<|assistant|>") in enc["input_ids"]  # a special token, one id
        trained, at = [], 0
        for m in messages:
            if m["role"] == "assistant":
                turn = f"<|assistant|>\n{m['content']}<|end|>\n"
                at = text.index(turn, at)
                trained.append((at + len("<|assistant|>\n"), at + len(turn)))
                at += len(turn)
        ends_with_answer = messages[-1]["role"] == "assistant"
        want = np.append(expected_mask(enc["offset_mapping"], trained, len(text)), ends_with_answer)
        np.testing.assert_array_equal(masks[i], want, err_msg=f"conversation {i}")


BAD = {
    "missing-key": ({"question": "q"}, "missing key 'solution'"),
    "empty-response": ({"question": "q", "solution": "  "}, "key 'solution' is empty"),
    "too-long": ({"question": "q", "solution": "word " * 200}, "longer than --seq-length 64"),
    "non-string": ({"question": "q", "solution": 5}, "key 'solution' is int"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_instruction_data_is_one_line_naming_the_line(tmp_path, capsys, hf_tokenizer_dir, kind):
    record, words = BAD[kind]
    write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "solution": "fine"}, record])
    r = run_rho(capsys, "tokenize", tmp_path / "d.jsonl", "-t", hf_tokenizer_dir, "-o", tmp_path / "d", "-w", "1",
                "--prompt-key", "question", "--response-key", "solution", "--seq-length", "64")
    assert r.exit_code == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "d.jsonl:2: " in lines[0] and words in lines[0], r.stderr
    assert not list(tmp_path.glob("d.*[!l]"))  # nothing written (d.jsonl is the input)
    r = run_rho(capsys, "tokenize", tmp_path / "d.jsonl", "-t", hf_tokenizer_dir, "-o", tmp_path / "d", "-w", "1",
                "--prompt-key", "question", "--response-key", "solution", "--seq-length", "64", "--on-error", "skip")
    assert r.exit_code == 0 and json.loads((tmp_path / "d.json").read_text())["skipped"][kind] == 1


def test_instruction_flags_are_checked(tmp_path, capsys, hf_tokenizer_dir):
    write_jsonl(tmp_path / "d.jsonl", [{"q": "q", "a": "a"}])
    base = ("tokenize", tmp_path / "d.jsonl", "-t", hf_tokenizer_dir, "-o", tmp_path / "d")
    for flags, words in [(("--prompt-key", "q"), "--prompt-key and --response-key go together"),
                         (("--mask-spans", "output"), "--mask-spans is for instruction data"),
                         (("--prompt-key", "q", "--response-key", "a", "--chat-template", "tokenizer"), "has no chat template"),
                         (("--prompt-key", "q", "--response-key", "a", "--chat-template", "nope"), "'nope' is neither"),
                         (("--prompt-key", "q", "--response-key", "a", "--mask-spans", "code"), "--mask-spans: expected"),
                         (("--prompt-key", "q", "--response-key", "a", "--json-key", "q"), "--json-key is for text")]:
        r = run_rho(capsys, *base, *flags)
        assert r.exit_code == 2 and words in r.stderr, (flags, r.stderr)
    assert not (tmp_path / "d.json").exists()
    shutil.rmtree(tmp_path)


def test_gsm8k_tora_outputs_are_what_python_prints(tora_jsonl):
    """gsm8k_tora computes each program's printed result without running it; Python itself, running
    the programs (a subprocess, GSM8K's own arithmetic only), prints the same."""
    import re
    import subprocess
    import sys

    _, records = tora_jsonl
    built = [r for r in records if r not in MULTIBYTE]
    programs = [re.search(r"```python\n(.*?)\n```", r["solution"], re.DOTALL).group(1) for r in built]
    runner = ("import contextlib, io, json, sys\nouts = []\nfor p in json.load(sys.stdin):\n"
              "    buf = io.StringIO()\n    with contextlib.redirect_stdout(buf):\n        exec(p, {})\n"
              "    outs.append(buf.getvalue())\nprint(json.dumps(outs))\n")
    proc = subprocess.run([sys.executable, "-c", runner], input=json.dumps(programs), capture_output=True,
                          text=True, timeout=60)
    printed = json.loads(proc.stdout)
    for r, out in zip(built, printed):
        shown = re.search(r"```output\n(.*?)\n```", r["solution"], re.DOTALL).group(1)
        assert out == shown + "\n", (r["question"], out, shown)
        assert float(shown) == float(r["answer"])
    assert len(built) == 40
