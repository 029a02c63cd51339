"""``rho score`` on each rank: the reference model forward only, per-token losses into a score store.

Documents are cut into windows (``parallel.scores.document_windows``) and packed into micro-batches of
``micro_batch_size`` windows of ``window`` tokens; megatron's forward-only schedule runs them through
the TP/PP model; the last stage computes per-token losses with the same fused vocab-parallel path as
training (``parallel.loss.token_losses``: no full-vocabulary gather).

Work is divided into shards of ``shard_documents`` consecutive documents; data-parallel ranks take
shards round-robin. A finished shard is written by the last stage's first TP rank as a small
IndexedDataset in ``OUTPUT.rho-work/`` and marked done, so a killed run resumes where it stopped.
At the end rank 0 concatenates the shards in order (megatron's ``IndexedDatasetBuilder.add_index``)
and publishes the store. Which rank scores a document does not change its numbers: the store is the
same for any DP size (and equal within fp32 reduction order for any TP/PP layout).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from parallel import checkpoint as ckpt
from parallel.config import ModelConfig
from parallel.distributed import Layout
from parallel.model import build_model, model_shape
from parallel.manifest import store_fingerprint
from parallel.scores import SCORES_FORMAT, SCORES_FORMAT_VERSION, Window, document_windows


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    model: ModelConfig
    vocab_size: int
    checkpoint: str
    tokens: str
    tokens_fingerprint: str
    output: str
    window: int
    stride: int
    micro_batch_size: int
    microbatches_per_call: int
    shard_documents: int
    eod_id: int
    tp: int
    pp: int
    manifest_extra: dict[str, Any]


class Scorer:
    def __init__(self, spec: ScoreSpec, layout: Layout, on_event: Callable[[str, dict], None] | None = None):
        from megatron.core import parallel_state as ps

        self.spec = spec
        self.layout = layout
        self.on_event = on_event or (lambda kind, payload: None)
        self.work = Path(spec.output + ".rho-work")
        self.is_last = ps.is_pipeline_last_stage()
        self.writer = self.is_last and ps.get_tensor_model_parallel_rank() == 0
        self.dp_rank = ps.get_data_parallel_rank()
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        shape = model_shape(spec.model, spec.vocab_size, layout.tp, dtype)
        model = build_model(spec.model, shape, layout.tp, layout.pp, ps.is_pipeline_first_stage(), self.is_last)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        ckpt.load_checkpoint(Path(spec.checkpoint), [model], optimizer=None)
        model.eval()
        self.model = model

    def _batches(self, windows: list[Window]):
        W, mbs = self.spec.window, self.spec.micro_batch_size
        for i in range(0, len(windows), mbs):
            group = windows[i:i + mbs]
            tokens = torch.zeros(mbs, W, dtype=torch.long)
            labels = torch.zeros(mbs, W, dtype=torch.long)
            mask = torch.zeros(mbs, W)
            for row, w in enumerate(group):
                n = len(w.inputs)
                tokens[row, :n] = torch.tensor(w.inputs)
                labels[row, :n] = torch.tensor(w.labels)
                mask[row, :n] = 1.0
            positions = torch.arange(W).unsqueeze(0).expand(mbs, W).contiguous()
            yield {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": positions}

    @torch.no_grad()
    def _score_windows(self, windows: list[Window]) -> list[torch.Tensor]:
        """Per-token losses [window] of each window (last stage only; [] elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from parallel.loss import token_losses

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            out = token_losses(model, batch)

            def loss_func(losses):
                return losses.sum(), torch.tensor(1, dtype=torch.int), {"losses": losses.detach().float().cpu()}

            return out, loss_func

        per_window: list[torch.Tensor] = []
        batches = list(self._batches(windows))
        step = self.spec.microbatches_per_call
        for i in range(0, len(batches), step):
            chunk = batches[i:i + step]
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(chunk), model=[self.model],
                num_microbatches=len(chunk), seq_length=self.spec.window,
                micro_batch_size=self.spec.micro_batch_size, forward_only=True,
            )
            if self.is_last:
                for out in outputs:
                    per_window.extend(out["losses"].unbind(0))
        return per_window[:len(windows)]

    def run(self) -> dict[str, Any]:
        import torch.distributed as dist
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        spec = self.spec
        tokens = IndexedDataset(spec.tokens, mmap=True)
        doc_index = np.asarray(tokens.document_indices)
        n_docs = len(doc_index) - 1
        n_shards = (n_docs + spec.shard_documents - 1) // spec.shard_documents
        if self.layout.rank == 0:
            self.work.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        mine = [s for s in range(n_shards) if s % self.layout.dp == self.dp_rank]
        done_before = sum(1 for s in range(n_shards) if (self.work / f"shard_{s:06d}.done").exists())
        self.on_event("start", {"documents": n_docs, "shards": n_shards, "resumed_shards": done_before,
                                "tokens": int(np.asarray(tokens.sequence_lengths, dtype=np.int64).sum())})
        t0 = time.perf_counter()
        scored_tokens = 0
        for shard in mine:
            if (self.work / f"shard_{shard:06d}.done").exists():
                continue
            first, last = shard * spec.shard_documents, min(n_docs, (shard + 1) * spec.shard_documents)
            docs = {d: _document(tokens, doc_index, d) for d in range(first, last)}
            windows = [w for d, toks in docs.items() for w in document_windows(d, toks.tolist(), spec.eod_id, spec.window, spec.stride)]
            losses = self._score_windows(windows)
            if self.writer:
                self._write_shard(shard, docs, windows, losses)
            scored_tokens += sum(len(t) for t in docs.values())
            self.on_event("progress", {"shard": shard, "tokens": scored_tokens * self.layout.dp,
                                       "elapsed_s": time.perf_counter() - t0, "shards_total": n_shards})
        dist.barrier()
        result = {}
        if self.layout.rank == 0:
            result = self._publish(n_shards, tokens)
        dist.barrier()
        self.on_event("done", result)
        return result

    def _write_shard(self, shard: int, docs: dict[int, np.ndarray], windows: list[Window], losses) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        values = {d: np.full(len(t), np.nan, dtype=np.float32) for d, t in docs.items()}
        for w, loss in zip(windows, losses):
            seg = loss[w.window_positions.start:w.window_positions.stop].numpy()
            values[w.document][w.doc_positions.start:w.doc_positions.stop] = seg
        tmp = self.work / f".shard_{shard:06d}.tmp"
        builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=np.float32)
        for d in sorted(values):
            builder.add_document(values[d], [len(values[d])])
        builder.finalize(str(tmp) + ".idx")
        final = self.work / f"shard_{shard:06d}"
        os.replace(str(tmp) + ".bin", str(final) + ".bin")
        os.replace(str(tmp) + ".idx", str(final) + ".idx")
        (self.work / f"shard_{shard:06d}.done").write_text("ok\n")

    def _publish(self, n_shards: int, tokens) -> dict[str, Any]:
        from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

        spec = self.spec
        out = Path(spec.output)
        staging = self.work / "final"
        builder = IndexedDatasetBuilder(str(staging) + ".bin", dtype=np.float32)
        for s in range(n_shards):
            builder.add_index(str(self.work / f"shard_{s:06d}"))
        builder.finalize(str(staging) + ".idx")
        scores = IndexedDataset(str(staging), mmap=True)
        lengths = np.asarray(scores.sequence_lengths)
        if not np.array_equal(lengths, np.asarray(tokens.sequence_lengths)):
            raise RuntimeError("score store and token dataset disagree on document lengths")  # invariant
        all_values = np.memmap(str(staging) + ".bin", dtype=np.float32, mode="r")
        hist, edges = np.histogram(all_values[np.isfinite(all_values)], bins=40, range=(0.0, 20.0))
        manifest = {
            "format": SCORES_FORMAT,
            "format_version": SCORES_FORMAT_VERSION,
            "fingerprint": store_fingerprint(staging),
            "dtype": "float32",
            "value": "reference model's cross-entropy (nats) for predicting each token",
            "first_token": "predicted from the end-of-document id alone",
            "window": {"tokens": spec.window, "stride": spec.stride},
            "token_dataset": {"prefix": spec.tokens, "fingerprint": spec.tokens_fingerprint,
                              "documents": int(len(lengths)), "tokens": int(lengths.sum())},
            "statistics": {
                "mean": float(all_values.mean()) if all_values.size else None,
                "std": float(all_values.std()) if all_values.size else None,
                "min": float(all_values.min()) if all_values.size else None,
                "max": float(all_values.max()) if all_values.size else None,
                "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in hist]},
            },
            **spec.manifest_extra,
        }
        Path(str(staging) + ".json").write_text(json.dumps(manifest, indent=2) + "\n")
        for ext in (".bin", ".idx", ".json"):  # manifest last: it marks a complete store
            os.replace(str(staging) + ext, str(out) + ext)
        shutil.rmtree(self.work, ignore_errors=True)
        return {"output": str(out), "documents": int(len(lengths)), "tokens": int(lengths.sum()),
                "mean": manifest["statistics"]["mean"]}


def _document(tokens, doc_index: np.ndarray, d: int) -> np.ndarray:
    first, last = int(doc_index[d]), int(doc_index[d + 1])
    parts = [tokens[j] for j in range(first, last)]
    return np.concatenate(parts) if len(parts) != 1 else parts[0]
