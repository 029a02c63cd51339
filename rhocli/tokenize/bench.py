"""``rho bench tokenize``: throughput of ``rho tokenize``, optionally beside Megatron-LM's
``tools/preprocess_data.py`` on the same input, tokenizer and worker count.

* whole-process: ``python -m rhocli tokenize ...`` timed from the outside (interpreter start, imports,
  worker start-up, writing, hashing: what a user waits for);
* steady-state: the same run in this process, from the first to the last job result;
* Megatron-LM (with ``megatron_lm``): its preprocess_data.py timed from the outside, then every
  document compared token for token with rho's output.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import re
import tempfile
import time
from pathlib import Path

from rhocli.core.errors import BadInputError, MissingInputError, UsageError


@dataclasses.dataclass
class Throughput:
    label: str
    wall_s: float
    documents: int
    text_bytes: int
    tokens: int

    def row(self) -> list[str]:
        s = max(self.wall_s, 1e-9)
        return [
            self.label,
            f"{self.wall_s:.2f}",
            f"{self.documents / s:,.0f}",
            f"{self.text_bytes / s / 1e6:.2f}",
            f"{self.tokens / s / 1e6:.3f}",
        ]


@dataclasses.dataclass
class BenchTokenizeReport:
    inputs: list[str]
    tokenizer: str
    workers: int
    rows: list[Throughput]
    megatron_identical: bool | None = None
    megatron_documents: int | None = None

    def speedup(self) -> float | None:
        by_label = {r.label: r for r in self.rows}
        if "megatron preprocess_data (whole process)" not in by_label:
            return None
        return by_label["megatron preprocess_data (whole process)"].wall_s / by_label["rho (whole process)"].wall_s


def _run_timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """(wall seconds, stdout + stderr) of ``cmd``; a failing run is a one-line error."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise BadInputError(f"benchmark run failed ({' '.join(cmd[:4])} ...): {tail[0]}")
    return wall, proc.stdout + proc.stderr


_MEGATRON_STATS = re.compile(r"Processed (\d+) documents \(([\d.]+) docs/s, ([\d.]+) MB/s\)")


def _megatron_processing_rate(stdout: str) -> tuple[int, float, float] | None:
    """(documents, docs/s, MB/s) from the last progress line preprocess_data.py prints (its MB are MiB,
    measured from the start of its processing loop, i.e. after its imports)."""
    matches = _MEGATRON_STATS.findall(stdout)
    if not matches:
        return None
    docs, docs_s, mib_s = matches[-1]
    return int(docs), float(docs_s), float(mib_s)


def run_bench_tokenize(
    inputs: list[str],
    tokenizer: str,
    workers: int,
    json_keys: tuple[str, ...] = ("text",),
    megatron_lm: Path | None = None,
    keep: Path | None = None,
) -> BenchTokenizeReport:
    from rhocli.core.formats.tokens import TokenDataset
    from rhocli.tokenize.pipeline import TokenizeConfig, default_workers, run_tokenize
    from rhocli.tokenize.sources import expand_inputs

    sources = expand_inputs(inputs)
    workers = workers or default_workers()
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="rho-bench-tokenize-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        common = [*map(str, inputs), "-t", str(tokenizer), "-w", str(workers), "--force"]
        for key in json_keys:
            common += ["--json-key", key]
        wall, _ = _run_timed([sys.executable, "-m", "rhocli", "tokenize", *common, "-o", str(workdir / "rho_cli")])
        cfg = TokenizeConfig(
            inputs=tuple(map(str, inputs)), tokenizer=str(tokenizer), output=str(workdir / "rho_lib"),
            json_keys=json_keys, workers=workers, force=True,
        )
        summary = run_tokenize(cfg)
        rows = [
            Throughput("rho (whole process)", wall, summary.documents, summary.text_bytes, summary.tokens),
            Throughput("rho (steady state)", summary.steady_s, summary.steady_documents,
                       summary.steady_text_bytes, summary.steady_tokens),
        ]
        report = BenchTokenizeReport([str(i) for i in inputs], str(tokenizer), workers, rows)
        if megatron_lm is not None:
            script = Path(megatron_lm) / "tools" / "preprocess_data.py"
            if not script.is_file():
                raise MissingInputError(f"{script}: not found; --megatron-lm must name a Megatron-LM checkout")
            if len(sources) != 1 or sources[0].kind != "jsonl" or sources[0].compression or len(json_keys) != 1:
                raise UsageError("--megatron-lm: compare on one plain .jsonl input with one --json-key")
            if not str(tokenizer).endswith(".model"):
                raise UsageError("--megatron-lm: compare with a SentencePiece .model tokenizer")
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(megatron_lm), env.get("PYTHONPATH")]))
            env.setdefault("PYTHONWARNINGS", "ignore")
            m_prefix = workdir / "megatron"
            m_wall, m_stdout = _run_timed(
                [sys.executable, str(script), "--input", str(sources[0].path), "--output-prefix", str(m_prefix),
                 "--json-keys", json_keys[0], "--tokenizer-type", "GPTSentencePieceTokenizer",
                 "--tokenizer-model", str(tokenizer), "--append-eod", "--workers", str(workers)],
                env=env,
            )
            m_ds = TokenDataset(f"{m_prefix}_{json_keys[0]}_document")
            r_ds = TokenDataset(workdir / "rho_cli")
            identical = m_ds.num_documents == r_ds.num_documents and all(
                (m_ds.document(i) == r_ds.document(i)).all() for i in range(r_ds.num_documents)
            )
            report.rows.append(
                Throughput("megatron preprocess_data (whole process)", m_wall, m_ds.num_documents,
                           summary.text_bytes, m_ds.num_tokens)
            )
            rate = _megatron_processing_rate(m_stdout)
            if rate is not None:
                docs, docs_s, mib_s = rate
                report.rows.append(
                    Throughput("megatron preprocess_data (its own steady rate)", docs / docs_s, docs,
                               int(mib_s * 1024 * 1024 * docs / docs_s),
                               int(m_ds.num_tokens * docs / max(m_ds.num_documents, 1)))
                )
            report.megatron_identical = identical
            report.megatron_documents = m_ds.num_documents
        return report
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
