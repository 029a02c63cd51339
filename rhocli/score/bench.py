"""``rho bench score``: tokens/s of ``rho score`` against plain ``transformers`` forward loops over
the same documents and windows with the same weights (the checkpoint exported with rho convert-hf).

Every side scores every token of the first ``documents`` documents with the same window policy
(``parallel.windows.document_windows``) and writes one float32 loss per token. rho is timed as a
whole process (``python -m rhocli score``: interpreter start, imports, process group, checkpoint
load, writing and publishing the store); transformers as its loop alone (model already loaded),
which favours transformers. Two transformers loops, both under ``torch.inference_mode`` and both
computing the cross-entropy only on the positions a window scores:

* one window per forward (no padding);
* batched: windows sorted by length, ``micro_batch_size`` per forward, right-padded with an
  attention mask (what a user batching on purpose writes; the sort keeps padding small).

The speed-up is reported against the faster of the two. Each of the three is run ``repeats`` times,
alternating (rho, loop, loop, rho, ...), and its best time is kept: on a shared machine a burst of
load elsewhere then slows one attempt, not one side.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rhocli.core.errors import WorkerError


@dataclasses.dataclass
class ScoreBenchReport:
    tokens: int
    rho_s: float
    #: transformers loop name -> (seconds, max |score difference| against rho)
    transformers: dict[str, tuple[float, float]]
    micro_batch_size: int
    repeats: int = 1

    @property
    def speedup(self) -> float:
        return min(s for s, _ in self.transformers.values()) / self.rho_s



def run_bench_score(model: str, data: str, documents: int, seq_len: int, stride: int, micro_batch_size: int | None,
                    extra: list[str], run_command, repeats: int = 2) -> ScoreBenchReport:
    """``run_command(argv)`` runs a rho command line (``rhocli.app.invoke``): it exports the model for
    the transformers side with ``rho convert-hf``."""
    import numpy as np
    import torch

    from parallel.scorer import default_micro_batch_size
    from parallel.windows import document_windows
    from rhocli.core.formats.tokens import TokenDataset, write_subset
    from rhocli.core.megatron_io import indexed_dataset

    on_gpu = torch.cuda.is_available()
    micro_batch_size = micro_batch_size or default_micro_batch_size(seq_len, on_gpu)

    work = Path(tempfile.mkdtemp(prefix="rho-bench-score-"))
    try:
        # a subset of the dataset as its own token dataset (so both sides score the same documents)
        ds = TokenDataset(data)
        n = write_subset(data, work / "subset", documents)["documents"]
        docs = [ds.document(i).astype(np.int64) for i in range(n)]
        run_command(["convert-hf", model, str(work / "hf"), "--dtype", "fp32"])
        command = [sys.executable, "-m", "rhocli", "score", "--model", model, "--data", str(work / "subset"),
                   "--output", str(work / "scores"), "--seq-len", str(seq_len), "--stride", str(stride),
                   "--micro-batch-size", str(micro_batch_size), "-q", "--force", *extra]
        from transformers import AutoModelForCausalLM

        # fp32 like rho's CPU path; on a GPU both sides run bf16 (rho score's GPU dtype)
        hf = AutoModelForCausalLM.from_pretrained(work / "hf").eval()
        hf = hf.to("cuda", torch.bfloat16) if on_gpu else hf.float()
        eod = int((ds.manifest or {}).get("tokenizer", {}).get("eod_id", 0))
        windows = [w for i, doc in enumerate(docs) for w in document_windows(i, doc.tolist(), eod, seq_len, stride)]
        loops = {"one window per forward": _one_window_loop,
                 f"batched ({micro_batch_size} windows, sorted by length)": _batched_loop}
        rho_s = float("inf")
        results: dict[str, tuple[float, float]] = {}
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True)
            rho_s = min(rho_s, time.perf_counter() - t0)
            if proc.returncode != 0:
                raise WorkerError(f"rho score failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            store = indexed_dataset().IndexedDataset(str(work / "scores"))
            rho_scores = [np.array(store[i]) for i in range(n)]
            del store
            for name, loop in loops.items():
                out = [np.full(len(d), np.nan, dtype=np.float32) for d in docs]
                t0 = time.perf_counter()
                with torch.inference_mode():
                    loop(hf, windows, out, micro_batch_size)
                if on_gpu:
                    torch.cuda.synchronize()
                secs = time.perf_counter() - t0
                diff = max(float(np.abs(o - r).max()) for o, r in zip(out, rho_scores))
                best = results.get(name, (float("inf"), 0.0))
                results[name] = (min(best[0], secs), max(best[1], diff))
        return ScoreBenchReport(int(sum(map(len, docs))), rho_s, results, micro_batch_size, max(1, repeats))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _one_window_loop(hf, windows, out, micro_batch_size):
    import torch
    import torch.nn.functional as F

    device = hf.device
    for w in windows:
        logits = hf(torch.tensor([w.inputs], device=device)).logits[0]
        p = w.window_positions
        ce = F.cross_entropy(logits[p.start:p.stop].float(), torch.tensor(w.labels[p.start:p.stop], device=device),
                             reduction="none")
        out[w.document][w.doc_positions.start:w.doc_positions.stop] = ce.cpu().numpy()


def _batched_loop(hf, windows, out, micro_batch_size):
    import torch
    import torch.nn.functional as F

    device = hf.device
    order = sorted(windows, key=lambda w: -len(w.inputs))
    for k in range(0, len(order), micro_batch_size):
        group = order[k:k + micro_batch_size]
        length = len(group[0].inputs)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        attention = torch.zeros(len(group), length, dtype=torch.long)
        scored = torch.zeros(len(group), length, dtype=torch.bool)
        labels = torch.zeros(len(group), length, dtype=torch.long)
        for r, w in enumerate(group):
            ids[r, :len(w.inputs)] = torch.tensor(w.inputs)
            attention[r, :len(w.inputs)] = 1
            labels[r, :len(w.labels)] = torch.tensor(w.labels)
            scored[r, w.window_positions.start:w.window_positions.stop] = True
        scored, labels = scored.to(device), labels.to(device)
        logits = hf(ids.to(device), attention_mask=attention.to(device)).logits
        ce = F.cross_entropy(logits[scored].float(), labels[scored], reduction="none").cpu().split(
            [len(w.window_positions) for w in group])
        for w, values in zip(group, ce):
            out[w.document][w.doc_positions.start:w.doc_positions.stop] = values.numpy()
