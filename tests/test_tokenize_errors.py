"""Bad input to rho tokenize: one clear line naming the file (and line), a distinct exit code, and
nothing left under the output prefix."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import write_jsonl
from rho_cli import run_rho
from rhocli.core.errors import BadInputError, LoadError, MissingInputError, OutputExistsError, UsageError

BAD_LINES = {
    # category: (line text, message fragment)
    "invalid-json": ('{"text": "unterminated', "invalid JSON"),
    "missing-key": ('{"body": "no text key"}', "missing key 'text'"),
    "non-string": ('{"text": 42}', "key 'text' is int, not a string"),
    "empty": ('{"text": "   "}', "empty document"),
}


def _leftovers(directory: Path, stem: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(stem) or p.name.startswith(".rho-tmp"))


def _data_with_bad_line(tmp_path: Path, bad: bytes) -> Path:
    path = tmp_path / "d.jsonl"
    good = json.dumps({"text": "a good document"}).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + bad + b"\n" + good + b"\n")
    return path


@pytest.mark.parametrize("category", sorted(BAD_LINES) + ["invalid-utf8"])
def test_bad_document_fails_with_file_and_line(tmp_path, capsys, hf_tokenizer_dir, category):
    if category == "invalid-utf8":
        bad, fragment = b'{"text": "caf\xe9 au lait"}', "invalid UTF-8 at byte 13"
    else:
        text, fragment = BAD_LINES[category]
        bad = text.encode()
    data = _data_with_bad_line(tmp_path, bad)
    r = run_rho(capsys, "tokenize", data, "-t", hf_tokenizer_dir, "-o", tmp_path / "out", "-w", "1")
    assert r.exit_code == BadInputError.exit_code
    assert f"{data}:3: " in r.stderr and fragment in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert _leftovers(tmp_path, "out") == []


def test_skip_counts_every_category(tmp_path, capsys, hf_tokenizer_dir):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "good one"}).encode()]
    for text, _ in BAD_LINES.values():
        lines.append(text.encode())
    lines += [b'{"text": "\xff\xfe"}', b"[1, 2]", b"", json.dumps({"text": "good two"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    r = run_rho(capsys, "tokenize", path, "-t", hf_tokenizer_dir, "-o", tmp_path / "out", "-w", "1", "--on-error", "skip")
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((tmp_path / "out.json").read_text())
    assert manifest["documents"] == 2
    assert manifest["skipped"] == {
        "invalid-utf8": 1, "invalid-json": 2, "missing-key": 1, "non-string": 1, "empty": 1,
    }
    assert manifest["blank_lines_ignored"] == 1
    assert "skipped: invalid-json" in r.stdout


def test_txt_invalid_utf8_and_empty_file(tmp_path, capsys, hf_tokenizer_dir):
    (tmp_path / "a.txt").write_bytes(b"line one\nline two \xc3\x28 oops\n")
    r = run_rho(capsys, "tokenize", tmp_path / "a.txt", "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1")
    assert r.exit_code == 4 and "a.txt:1: invalid UTF-8" in r.stderr and "(line +1)" in r.stderr
    r = run_rho(capsys, "tokenize", tmp_path / "a.txt", "-t", hf_tokenizer_dir, "-o", tmp_path / "o",
                "-w", "1", "--txt-mode", "line")
    assert r.exit_code == 4 and "a.txt:2: invalid UTF-8" in r.stderr
    (tmp_path / "empty.txt").write_bytes(b"")
    r = run_rho(capsys, "tokenize", tmp_path / "empty.txt", "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1")
    assert r.exit_code == 4 and "empty.txt:1: empty document" in r.stderr


def test_only_bad_documents_is_an_error_even_when_skipping(tmp_path, capsys, hf_tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"text": ""}', '{"text": 1}'])
    r = run_rho(capsys, "tokenize", data, "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "--on-error", "skip", "-w", "1")
    assert r.exit_code == 4 and "no documents to write" in r.stderr
    assert _leftovers(tmp_path, "o") == []


def test_parquet_missing_column_and_null(tmp_path, capsys, hf_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "a.parquet")
    r = run_rho(capsys, "tokenize", tmp_path / "a.parquet", "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1")
    assert r.exit_code == 4 and "no column 'text' (columns: content)" in r.stderr
    pq.write_table(pa.table({"text": ["fine", None]}), tmp_path / "b.parquet")
    r = run_rho(capsys, "tokenize", tmp_path / "b.parquet", "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1")
    assert r.exit_code == 4 and "b.parquet:2: column 'text' is null" in r.stderr


def test_missing_unknown_and_directory_inputs(tmp_path, capsys, hf_tokenizer_dir):
    cases = [
        ((tmp_path / "nope.jsonl",), MissingInputError.exit_code, "nope.jsonl: input file not found"),
        ((str(tmp_path / "*.jsonl.gz"),), MissingInputError.exit_code, "no files match"),
        ((tmp_path,), UsageError.exit_code, "is a directory"),
    ]
    (tmp_path / "table.csv").write_text("a,b\n")
    cases.append(((tmp_path / "table.csv",), BadInputError.exit_code, "table.csv: unknown input type"))
    for inputs, code, fragment in cases:
        r = run_rho(capsys, "tokenize", *inputs, "-t", hf_tokenizer_dir, "-o", tmp_path / "o")
        assert r.exit_code == code, (inputs, r.stderr)
        assert fragment in r.stderr


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_input(tmp_path, capsys, hf_tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    data.chmod(0)
    r = run_rho(capsys, "tokenize", data, "-t", hf_tokenizer_dir, "-o", tmp_path / "o")
    assert r.exit_code == MissingInputError.exit_code and "not readable" in r.stderr


def test_truncated_gzip(tmp_path, capsys, hf_tokenizer_dir):
    payload = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(500)))
    (tmp_path / "t.jsonl.gz").write_bytes(payload[: len(payload) // 2])
    r = run_rho(capsys, "tokenize", tmp_path / "t.jsonl.gz", "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1")
    assert r.exit_code == 4 and "t.jsonl.gz: cannot read" in r.stderr
    assert _leftovers(tmp_path, "o") == []


def test_tokenizer_that_cannot_load(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    (tmp_path / "bad.model").write_bytes(b"this is not a sentencepiece model")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    (tmp_path / "other").mkdir()
    for tok, fragment in (
        (tmp_path / "bad.model", "not a loadable SentencePiece model"),
        (tmp_path / "hf", "not a loadable tokenizer.json"),
        (tmp_path / "other", "neither tokenizer.json nor tokenizer.model"),
    ):
        r = run_rho(capsys, "tokenize", data, "-t", tok, "-o", tmp_path / "o")
        assert r.exit_code == LoadError.exit_code, r.stderr
        assert fragment in r.stderr and "Traceback" not in r.stderr


def test_existing_output_needs_force_and_failed_force_keeps_old(tmp_path, capsys, hf_tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "first version"}])
    assert run_rho(capsys, "tokenize", data, "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1").exit_code == 0
    old = {ext: (tmp_path / f"o{ext}").read_bytes() for ext in (".bin", ".idx", ".json")}
    r = run_rho(capsys, "tokenize", data, "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1")
    assert r.exit_code == OutputExistsError.exit_code and "--force" in r.stderr
    # a --force run that fails leaves the old dataset untouched
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json"])
    r = run_rho(capsys, "tokenize", bad, "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1", "--force")
    assert r.exit_code == 4
    assert {ext: (tmp_path / f"o{ext}").read_bytes() for ext in old} == old
    # a --force run that succeeds replaces it
    new = write_jsonl(tmp_path / "new.jsonl", [{"text": "second version, longer"}])
    assert run_rho(capsys, "tokenize", new, "-t", hf_tokenizer_dir, "-o", tmp_path / "o", "-w", "1", "--force").exit_code == 0
    assert (tmp_path / "o.bin").read_bytes() != old[".bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rho-tmp")]


class HeldInput:
    """A named pipe as ``rho tokenize``'s input, fed with ``records`` and then held open: the run reads
    them, hands them to its workers, and waits for more, so it stays at that point until the test
    lets go. A signal sent then meets a run in the middle of its work, however fast the machine."""

    def __init__(self, tmp_path: Path, records: list[dict]):
        self.path = tmp_path / "held.jsonl"
        os.mkfifo(self.path)
        self.release = threading.Event()
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        threading.Thread(target=self._feed, args=(data,), daemon=True).start()

    def _feed(self, data: bytes) -> None:
        try:
            with open(self.path, "wb") as f:  # blocks until rho opens it
                f.write(data)
                f.flush()
                self.release.wait(120)
        except BrokenPipeError:  # rho is gone
            pass


def _start_held(tmp_path: Path, hf_tokenizer_dir: Path, **popen) -> tuple[subprocess.Popen, HeldInput]:
    """``rho tokenize`` on a held input, once it has forked its two workers and staged its output."""
    held = HeldInput(tmp_path, [{"text": f"document {i} " + "word " * 50} for i in range(200)])
    # SIGINT as a terminal gives it, even when the tests run with it ignored (nohup, a background job)
    proc = subprocess.Popen([sys.executable, "-m", "rhocli", "tokenize", str(held.path), "-t", str(hf_tokenizer_dir),
                             "-o", str(tmp_path / "out"), "-w", "2"],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)
    deadline = time.time() + 60
    while time.time() < deadline and not (len(_workers_of(proc.pid)) >= 2
                                          and any(p.name.startswith(".rho-tmp") for p in tmp_path.iterdir())):
        assert proc.poll() is None, "rho tokenize ended before it was held"
        time.sleep(0.05)
    return proc, held


def _workers_of(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _all_gone(processes, timeout: float = 20) -> bool:
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_killed_run_leaves_nothing_under_prefix(tmp_path, hf_tokenizer_dir):
    """SIGKILL in the middle of a run: no file under PREFIX (a hidden .rho-tmp-* dir may remain), and
    the tokenizer workers die with the main process."""
    proc, held = _start_held(tmp_path, hf_tokenizer_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = _workers_of(proc.pid)
    proc.kill()
    proc.wait()
    held.release.set()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []
    assert _all_gone(workers), "tokenizer workers outlived a kill -9 of rho"


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupted_run_cleans_up(tmp_path, hf_tokenizer_dir, sig, code, word):
    """Ctrl-C (SIGINT) or SIGTERM in the middle of a run: its exit code, one line, no output, no
    temporary directory, no worker left behind."""
    proc, held = _start_held(tmp_path, hf_tokenizer_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = _workers_of(proc.pid)
    proc.send_signal(sig)  # to rho only, as a scheduler or a terminal would
    _, stderr = proc.communicate(timeout=60)
    held.release.set()
    assert proc.returncode == code, stderr
    assert word in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != "held.jsonl"] == []
    assert _all_gone(workers)


def test_a_missing_output_directory_is_made_and_said(tmp_path, capsys, hf_tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    r = run_rho(capsys, "tokenize", data, "-t", hf_tokenizer_dir, "-o", tmp_path / "new" / "sub" / "o", "-w", "1")
    assert r.exit_code == 0 and f"created the directory {tmp_path / 'new'}" in " ".join(r.stdout.split()), r.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{not json"])
    r = run_rho(capsys, "tokenize", bad, "-t", hf_tokenizer_dir, "-o", tmp_path / "other" / "o", "-w", "1")
    assert r.exit_code == 4 and not (tmp_path / "other").exists()  # a failed run leaves no directory it made
