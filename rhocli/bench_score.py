"""``rho bench score``: tokens/s of ``rho score`` against a plain ``transformers`` forward loop over
the same documents and windows with the same weights (the checkpoint exported with rho convert-hf).

Both sides score every token of the first ``documents`` documents with the same window policy;
rho is timed as a whole process (``python -m rhocli score``, start-up included), transformers as the
loop alone (its model already loaded), which favours transformers.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rhocli.errors import WorkerError


@dataclasses.dataclass
class ScoreBenchReport:
    tokens: int
    rho_s: float
    transformers_s: float
    max_abs_diff: float

    def table(self):
        from rich.table import Table

        t = Table(title="rho bench score", title_justify="left")
        for c in ("run", "seconds", "tokens/s"):
            t.add_column(c, justify="left" if c == "run" else "right")
        t.add_row("rho score (whole process)", f"{self.rho_s:.2f}", f"{self.tokens / self.rho_s:,.0f}")
        t.add_row("transformers forward loop", f"{self.transformers_s:.2f}", f"{self.tokens / self.transformers_s:,.0f}")
        t.caption = f"rho {self.transformers_s / self.rho_s:.2f}x; max |score difference| {self.max_abs_diff:.2e}"
        return t


def run_bench_score(model: str, data: str, documents: int, seq_len: int, stride: int, micro_batch_size: int,
                    extra: list[str]) -> ScoreBenchReport:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from rhocli.convert import export_hf
    from rhocli.formats.tokens import TokenDataset
    from rhocli.megatron_io import indexed_dataset

    work = Path(tempfile.mkdtemp(prefix="rho-bench-score-"))
    try:
        # a subset of the dataset as its own token dataset (so both sides score the same documents)
        ds = TokenDataset(data)
        n = min(documents, ds.num_documents)
        builder = indexed_dataset().IndexedDatasetBuilder(str(work / "subset.bin"), dtype=ds.dtype.type)
        docs = [ds.document(i).astype(np.int64) for i in range(n)]
        for d in docs:
            builder.add_document(d.astype(ds.dtype), [len(d)])
        builder.finalize(str(work / "subset.idx"))
        manifest = dict(ds.manifest or {})
        from rhocli.formats.tokens import dataset_fingerprint

        manifest.update(fingerprint=dataset_fingerprint(work / "subset"), documents=n, tokens=int(sum(map(len, docs))))
        import json

        (work / "subset.json").write_text(json.dumps(manifest))
        export_hf(model, str(work / "hf"), dtype="fp32")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "rhocli", "score", "--model", model, "--data", str(work / "subset"),
                               "--output", str(work / "scores"), "--seq-len", str(seq_len), "--stride", str(stride),
                               "--micro-batch-size", str(micro_batch_size), "-q", *extra], capture_output=True, text=True)
        rho_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise WorkerError(f"rho score failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(work / "hf").eval()
        eod = int((ds.manifest or {}).get("tokenizer", {}).get("eod_id", 0))
        scores = indexed_dataset().IndexedDataset(str(work / "scores"))
        worst = 0.0
        t0 = time.perf_counter()
        for i, doc in enumerate(docs):
            ext = [eod] + doc.tolist()
            out = np.empty(len(doc), dtype=np.float32)
            start, scored = 0, 0
            while scored < len(doc):
                end = min(start + seq_len, len(doc))
                with torch.no_grad():
                    logits = hf(torch.tensor([ext[start:end]])).logits[0]
                ce = F.cross_entropy(logits.float(), torch.tensor(ext[start + 1:end + 1]), reduction="none").numpy()
                out[scored:end] = ce[scored - start:]
                scored, start = end, start + stride
            worst = max(worst, float(np.abs(out - scores[i]).max()))
        hf_s = time.perf_counter() - t0
        return ScoreBenchReport(int(sum(map(len, docs))), rho_s, hf_s, worst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
