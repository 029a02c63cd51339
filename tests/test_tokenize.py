"""rho tokenize against independent ground truth: megatron-core's own IndexedDataset reader and the
tokenizers' own encode functions."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, write_jsonl
from rho_cli import run_rho


def megatron_documents(prefix: Path) -> list[list[int]]:
    """Documents as megatron-core's IndexedDataset reads them (one sequence per document)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    doc_index = ds.document_indices
    assert len(doc_index) == len(ds) + 1  # rho writes exactly one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def hf_tokenizer(directory: Path):
    """The HF fast tokenizer itself (``tokenizers``), not rho's wrapper around it."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def test_gsm8k_llama2_sentencepiece_matches_encode(tmp_path, capsys, gsm8k, llama2_sp):
    import sentencepiece as spm

    prefix = tmp_path / "gsm8k"
    r = run_rho(capsys, "tokenize", gsm8k, "-t", llama2_sp, "-o", prefix,
                "--json-key", "question", "--json-key", "answer", "--workers", "2")
    assert r.exit_code == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(llama2_sp))
    records = [json.loads(line) for line in gsm8k.read_text(encoding="utf-8").splitlines()]
    expected = [sp.encode(rec["question"] + "\n" + rec["answer"]) + [sp.eos_id()] for rec in records]
    docs = megatron_documents(prefix)
    assert len(docs) == len(expected) == 7473
    assert docs == expected

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(str(prefix)).index.dtype == np.uint16  # smallest sufficient for 32k ids
    manifest = json.loads((tmp_path / "gsm8k.json").read_text())
    assert manifest["documents"] == 7473
    assert manifest["tokens"] == sum(map(len, expected))
    assert manifest["tokenizer"]["vocab_size"] == 32000
    assert (manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eod_id"]) == (1, 2)
    assert manifest["tokenizer"]["fingerprint"].startswith("sha256:")
    import hashlib
    # docs/formats.md: sha256 of the .idx bytes followed by the .bin bytes
    idx_then_bin = (tmp_path / "gsm8k.idx").read_bytes() + (tmp_path / "gsm8k.bin").read_bytes()
    assert manifest["fingerprint"] == "sha256:" + hashlib.sha256(idx_then_bin).hexdigest()
    assert manifest["sources"][0]["bytes"] == gsm8k.stat().st_size
    assert manifest["sources"][0]["sha256"] == "sha256:" + hashlib.sha256(gsm8k.read_bytes()).hexdigest()
    assert "7,473" in r.stdout  # the summary table


def test_hf_fast_tokenizer_matches_transformers(tmp_path, capsys, hf_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    texts = CORPUS[:6] + ["  leading spaces", "x"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    prefix = tmp_path / "hf"
    r = run_rho(capsys, "tokenize", data, "-t", hf_tokenizer_dir, "-o", prefix, "--prepend-bos", "-w", "1")
    assert r.exit_code == 0, r.stderr
    tok = PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer_dir / "tokenizer.json"))
    bos, eos = tok.convert_tokens_to_ids("<|begin|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    expected = [[bos] + tok.encode(t, add_special_tokens=False) + [eos] for t in texts]
    assert megatron_documents(prefix) == expected
    manifest = json.loads((tmp_path / "hf.json").read_text())
    assert manifest["tokenizer"]["kind"] == "huggingface"
    assert manifest["tokenizer"]["vocab_size"] == len(tok)  # base vocab + added special tokens


def test_workers_do_not_change_output_bytes(tmp_path, capsys, hf_tokenizer_dir):
    records = [{"text": f"{i}: {CORPUS[i % len(CORPUS)]}"} for i in range(3000)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        r = run_rho(capsys, "tokenize", data, "-t", hf_tokenizer_dir, "-o", prefix, "-w", workers)
        assert r.exit_code == 0, r.stderr
        outputs[workers] = [(tmp_path / f"w{workers}{ext}").read_bytes() for ext in (".bin", ".idx", ".json")]
    assert outputs[1] == outputs[2]


def test_every_input_format_gives_the_same_documents(tmp_path, capsys, hf_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [t.replace("\n", " ") for t in CORPUS[:6]]
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / "a.parquet")
    # line mode: blank lines between documents are ignored
    (tmp_path / "lines.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    # ground truth: HF tokenizers itself (the conftest tokenizer's EOS is <|endoftext|>)
    tok = hf_tokenizer(hf_tokenizer_dir)
    eod = tok.token_to_id("<|endoftext|>")
    expected = [tok.encode(t, add_special_tokens=False).ids + [eod] for t in texts]
    for name, extra in (("a.jsonl", ()), ("a.jsonl.gz", ()), ("a.jsonl.zst", ()), ("a.parquet", ()),
                        ("lines.txt", ("--txt-mode", "line"))):
        prefix = tmp_path / ("out_" + name.replace(".", "_"))
        r = run_rho(capsys, "tokenize", tmp_path / name, "-t", hf_tokenizer_dir, "-o", prefix, "-w", "1", *extra)
        assert r.exit_code == 0, (name, r.stderr)
        assert megatron_documents(prefix) == expected, name
    # document mode: each .txt file is one document; a glob picks files in sorted order
    for i, t in enumerate(texts[:3]):
        (tmp_path / f"doc{i}.txt").write_text(t + "\nsecond line\n", encoding="utf-8")
    r = run_rho(capsys, "tokenize", str(tmp_path / "doc*.txt"), "-t", hf_tokenizer_dir, "-o", tmp_path / "docs", "-w", "1")
    assert r.exit_code == 0, r.stderr
    assert megatron_documents(tmp_path / "docs") == [
        tok.encode(t + "\nsecond line\n", add_special_tokens=False).ids + [eod] for t in texts[:3]
    ]


def test_no_append_eod_and_several_inputs_in_order(tmp_path, capsys, hf_tokenizer_dir):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}, {"text": "second"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "third"}])
    r = run_rho(capsys, "tokenize", b, a, "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "--no-append-eod", "-w", "1")
    assert r.exit_code == 0, r.stderr
    tok = hf_tokenizer(hf_tokenizer_dir)
    assert megatron_documents(tmp_path / "o") == [tok.encode(t, add_special_tokens=False).ids for t in ("third", "first", "second")]
    manifest = json.loads((tmp_path / "o.json").read_text())
    assert [s["documents"] for s in manifest["sources"]] == [1, 2]


def test_rho_reads_megatron_manifestless_dataset(tmp_path):
    """A dataset written the way Megatron-LM's preprocess_data does (no manifest, several sentences
    per document with --split-sentences) is read by rho's reader."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from rhocli.core.formats.tokens import TokenDataset, dataset_fingerprint

    prefix = tmp_path / "megatron_text_document"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    docs = [[[5, 6, 7], [8, 9]], [[10]], [[11, 12], [13], [14, 15, 16]]]
    for doc in docs:
        flat = [t for sentence in doc for t in sentence]
        builder.add_document(torch.IntTensor(flat), [len(s) for s in doc])
    builder.finalize(str(prefix) + ".idx")
    ds = TokenDataset(prefix)
    assert ds.manifest is None
    assert ds.num_documents == 3
    assert ds.num_tokens == 12
    assert [ds.document(i).tolist() for i in range(3)] == [[5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15, 16]]
    assert ds.document_lengths().tolist() == [5, 1, 6]
    assert ds.fingerprint() == dataset_fingerprint(prefix)


def test_token_dataset_reader_uses_rho_manifest(tmp_path, capsys, hf_tokenizer_dir):
    from rhocli.core.formats.tokens import TokenDataset

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in CORPUS[:4]])
    r = run_rho(capsys, "tokenize", data, "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1")
    assert r.exit_code == 0
    ds = TokenDataset(tmp_path / "o")
    assert ds.manifest["documents"] == ds.num_documents == 4
    assert ds.document_lengths().tolist() == [len(ds.document(i)) for i in range(4)]


def test_config_file_supplies_options_and_flags_override(tmp_path, capsys, hf_tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"body": "hello there", "title": "Greeting"}])
    cfg = tmp_path / "tok.yaml"
    cfg.write_text(
        f"tokenize:\n  inputs: [{data}]\n  tokenizer: {hf_tokenizer_dir}\n  json_keys: [title, body]\n"
        f"  output: {tmp_path / 'from_yaml'}\n  workers: 1\n  append_eod: false\n"
    )
    r = run_rho(capsys, "tokenize", "--config", cfg, "-o", tmp_path / "flag_out")
    assert r.exit_code == 0, r.stderr
    assert not (tmp_path / "from_yaml.bin").exists()
    tok = hf_tokenizer(hf_tokenizer_dir)
    assert megatron_documents(tmp_path / "flag_out") == [tok.encode("Greeting\nhello there", add_special_tokens=False).ids]
    import yaml

    resolved = yaml.safe_load((tmp_path / "flag_out.config.yaml").read_text())["tokenize"]
    assert resolved["output"] == str(tmp_path / "flag_out")
    assert resolved["json_keys"] == ["title", "body"] and resolved["append_eod"] is False
    # the resolved config reproduces the run
    r = run_rho(capsys, "tokenize", "--config", tmp_path / "flag_out.config.yaml", "-o", tmp_path / "again")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "flag_out.bin").read_bytes()


@pytest.mark.parametrize(
    "yaml_text, message",
    [("tokenize:\n  worker: 2\n", "unknown option 'worker'"),
     ("tokenize:\n  workers: two\n", "expected an integer"),
     ("tokenize: [\n", "not valid YAML")],
)
def test_bad_config_file(tmp_path, capsys, yaml_text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    r = run_rho(capsys, "tokenize", "--config", cfg)
    assert r.exit_code == 8
    assert message in r.stderr and str(cfg) in r.stderr
