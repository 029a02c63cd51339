"""``rho score`` on each rank: the reference model forward only, per-token losses into a score store.

Documents are cut into windows (``parallel.windows.document_windows``). A shard's windows are sorted by
length and packed ``micro_batch_size`` at a time (default: ``default_micro_batch_size``), each
micro-batch padded only to its longest window (rounded up to ``PAD_MULTIPLE``); megatron's
forward-only schedule runs them through the TP/PP model, one call per run of equal-shape
micro-batches. The last stage's GPTModel returns its final hidden
states (``post_process`` is turned off after loading), and ``parallel.output_stats.OutputStats`` applies the
vocab-parallel output layer to the positions each window scores only (a window's context positions,
half of a sliding window, never reach the output layer), reducing the logits to (logsumexp, target
logit) per row with cuda_ext's fused ``row_stats`` kernel, in cache-sized blocks on CPU; one
all-gather of those two numbers per row combines TP ranks (``cuda_ext.tp``: no full-vocabulary
gather). Values equal the training loss path's (``parallel.loss.token_losses``) up to fp32
summation order.

The weights come in through ``load_weights`` (the caller's: a rho checkpoint, or each rank's shard of
a HF model through ``parallel.hf.load_hf_into_model``); the losses go out through ``sink`` (the
caller's store writer: ``is_done`` / ``write_shard`` / ``prepare`` / ``publish``).

Work is divided into shards of ``shard_documents`` consecutive documents; data-parallel ranks take
shards round-robin. A finished shard is handed to the sink by the last stage's first TP rank, which
marks it done, so a killed run resumes where it stopped; at the end rank 0 has the sink publish the
store. Which rank scores a document does not change its numbers: the store is the same for any DP
size (and equal within fp32 reduction order for any TP/PP layout).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Protocol

import numpy as np
import torch

from parallel.config import ModelConfig
from parallel.distributed import Layout
from parallel.model import ModelShape, build_model, model_shape
from parallel.output_stats import OutputStats
from parallel.windows import Window, document_windows


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    model: ModelConfig
    vocab_size: int
    #: the token dataset to score (a megatron IndexedDataset prefix)
    tokens: str
    window: int
    stride: int
    #: windows per forward; None: ``default_micro_batch_size(window, on_gpu)``
    micro_batch_size: int | None
    microbatches_per_call: int
    shard_documents: int
    eod_id: int
    tp: int
    pp: int
    #: sequence parallelism (TP > 1): norms and the residual stream hold 1/tp of each window
    sequence_parallel: bool = False
    #: also the entropy of the model's next-token distribution at each position (``entropy_sink``)
    entropy: bool = False


class ScoreSink(Protocol):
    def prepare(self) -> None: ...
    def is_done(self, shard: int) -> bool: ...
    def write_shard(self, shard: int, values: dict[int, np.ndarray]) -> None: ...
    def publish(self, n_shards: int, token_lengths: np.ndarray) -> dict[str, Any]: ...


#: load_weights(model, shape, tp_rank, pp_rank): fill this rank's freshly built model
WeightLoader = Callable[[Any, ModelShape, int, int], None]


#: a micro-batch is padded to its longest window rounded up to this
PAD_MULTIPLE = 8
#: default micro-batch, in positions (windows x window length). On the 2-core VM (tiny model,
#: window 128) 8 windows per forward took 27-29 s for 1,500 GSM8K documents, 32 windows 22-25 s,
#: 64 windows 24 s: small forwards pay PyTorch's per-op overhead ~40 times per layer. A GPU wants
#: larger forwards still (16 windows of 1,024, 8 of 2,048).
CPU_POSITIONS_PER_FORWARD = 4096
GPU_POSITIONS_PER_FORWARD = 16384


def default_micro_batch_size(window: int, on_gpu: bool) -> int:
    budget = GPU_POSITIONS_PER_FORWARD if on_gpu else CPU_POSITIONS_PER_FORWARD
    return max(1, budget // window)


@dataclasses.dataclass
class _MicroBatch:
    windows: list[int]  # indices into the shard's window list, one per row
    tokens: torch.Tensor  # [b, s]
    positions: torch.Tensor  # [b, s]
    rows: torch.Tensor  # flat indices of the scored positions in the [s*b, h] hidden states
    labels: torch.Tensor  # [n scored]
    sizes: list[int]  # scored positions per row


class Scorer:
    def __init__(self, spec: ScoreSpec, layout: Layout, sink: ScoreSink, load_weights: WeightLoader,
                 on_event: Callable[[str, dict], None] | None = None, entropy_sink: ScoreSink | None = None):
        from megatron.core import parallel_state as ps

        self.spec = spec
        self.layout = layout
        self.sink = sink
        #: where the entropies go (``spec.entropy``): a second store, shard for shard with ``sink``
        self.entropy_sink = entropy_sink
        if spec.entropy and entropy_sink is None:
            raise ValueError("ScoreSpec.entropy needs an entropy_sink")
        self.on_event = on_event or (lambda kind, payload: None)
        self.is_last = ps.is_pipeline_last_stage()
        self.writer = self.is_last and ps.get_tensor_model_parallel_rank() == 0
        self.dp_rank = ps.get_data_parallel_rank()
        on_gpu = torch.cuda.is_available()
        dtype = torch.bfloat16 if on_gpu else torch.float32
        self.micro_batch_size = spec.micro_batch_size or default_micro_batch_size(spec.window, on_gpu)
        self.shape = shape = model_shape(spec.model, spec.vocab_size, layout.tp, dtype)
        features = {"sequence_parallel": True} if spec.sequence_parallel else {}
        model = build_model(spec.model, shape, layout.tp, layout.pp, ps.is_pipeline_first_stage(), self.is_last,
                            features=features, weights_loaded=True)  # load_weights fills every one
        # a micro-batch's length: a multiple of PAD_MULTIPLE, and of tp under sequence parallelism
        self.pad_multiple = math.lcm(PAD_MULTIPLE, layout.tp) if spec.sequence_parallel else PAD_MULTIPLE
        if on_gpu:
            model.cuda(torch.cuda.current_device())
        load_weights(model, shape, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
        model.eval()
        # the last stage's GPTModel returns its final hidden states; the output layer is applied to the
        # scored positions only (a window's context positions never reach it)
        self.output_stats = (OutputStats(model, spec.vocab_size, layout.tp, spec.sequence_parallel, spec.entropy)
                             if self.is_last else None)
        self.model = model

    def _micro_batches(self, windows: list[Window]) -> list[_MicroBatch]:
        """Windows sorted by length (longest first), ``micro_batch_size`` per micro-batch, each padded
        only to its own longest window (rounded up to a multiple of ``PAD_MULTIPLE``)."""
        mbs = self.micro_batch_size
        order = sorted(range(len(windows)), key=lambda i: (-len(windows[i].inputs), i))
        batches = []
        for k in range(0, len(order), mbs):
            idx = order[k:k + mbs]
            b = len(idx)
            length = -(-len(windows[idx[0]].inputs) // self.pad_multiple) * self.pad_multiple
            tokens = torch.zeros(b, length, dtype=torch.long)
            rows, labels, sizes = [], [], []
            for r, i in enumerate(idx):
                w = windows[i]
                tokens[r, :len(w.inputs)] = torch.tensor(w.inputs)
                p = w.window_positions
                # hidden states come sequence-first [s, b, h]: position p of row r is row p*b + r
                rows.append(torch.arange(p.start, p.stop) * b + r)
                labels.extend(w.labels[p.start:p.stop])
                sizes.append(len(p))
            positions = torch.arange(length).unsqueeze(0).expand(b, length).contiguous()
            batches.append(_MicroBatch(idx, tokens, positions, torch.cat(rows), torch.tensor(labels), sizes))
        return batches

    @torch.inference_mode()
    def _score_windows(self, windows: list[Window]) -> list[torch.Tensor]:
        """Losses of each window's scored positions (``window_positions``), in window order (last
        stage only; [] elsewhere): [n] each, or [n, 2] (loss, entropy) with ``spec.entropy``."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            hidden = model(mb.tokens.to(device, non_blocking=True), mb.positions.to(device, non_blocking=True),
                           attention_mask=None)
            if self.is_last:
                hidden = self.output_stats(hidden, mb.rows.to(device), mb.labels.to(device))

            def loss_func(losses):
                return losses.sum(), torch.tensor(1, dtype=torch.int), {"losses": losses.float().cpu()}

            return hidden, loss_func

        per_window: list[torch.Tensor | None] = [None] * len(windows)
        batches = self._micro_batches(windows)
        # one schedule call per run of micro-batches of the same shape (pipeline p2p needs one shape)
        i = 0
        while i < len(batches):
            shape = batches[i].tokens.shape
            j = i + 1
            while j < len(batches) and j - i < self.spec.microbatches_per_call and batches[j].tokens.shape == shape:
                j += 1
            chunk = batches[i:j]
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(chunk), model=[self.model],
                num_microbatches=len(chunk), seq_length=shape[1], micro_batch_size=shape[0], forward_only=True,
            )
            if self.is_last:
                for mb, out in zip(chunk, outputs):
                    for w, losses in zip(mb.windows, out["losses"].split(mb.sizes)):
                        per_window[w] = losses
            i = j
        return per_window if self.is_last else []

    def run(self) -> dict[str, Any]:
        import torch.distributed as dist
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        spec = self.spec
        tokens = IndexedDataset(spec.tokens, mmap=True)
        doc_index = np.asarray(tokens.document_indices)
        n_docs = len(doc_index) - 1
        n_shards = (n_docs + spec.shard_documents - 1) // spec.shard_documents
        sinks = [self.sink] + ([self.entropy_sink] if self.spec.entropy else [])
        if self.layout.rank == 0:
            for sink in sinks:
                sink.prepare()
        dist.barrier()
        mine = [s for s in range(n_shards) if s % self.layout.dp == self.dp_rank]
        done = lambda s: all(sink.is_done(s) for sink in sinks)  # noqa: E731
        done_before = sum(1 for s in range(n_shards) if done(s))
        self.on_event("start", {"documents": n_docs, "shards": n_shards, "resumed_shards": done_before,
                                "tokens": int(np.asarray(tokens.sequence_lengths, dtype=np.int64).sum())})
        t0 = time.perf_counter()
        scored_tokens = 0
        for shard in mine:
            if done(shard):
                continue
            first, last = shard * spec.shard_documents, min(n_docs, (shard + 1) * spec.shard_documents)
            docs = {d: _document(tokens, doc_index, d) for d in range(first, last)}
            windows = [w for d, toks in docs.items() for w in document_windows(d, toks.tolist(), spec.eod_id, spec.window, spec.stride)]
            losses = self._score_windows(windows)
            if self.writer:
                if self.spec.entropy:  # the entropies first: a shard counts as done once its losses are
                    self.entropy_sink.write_shard(shard, _document_values(docs, windows, [v[:, 1] for v in losses]))
                    losses = [v[:, 0] for v in losses]
                self.sink.write_shard(shard, _document_values(docs, windows, losses))
            scored_tokens += sum(len(t) for t in docs.values())
            self.on_event("progress", {"shard": shard, "tokens": scored_tokens * self.layout.dp,
                                       "elapsed_s": time.perf_counter() - t0, "shards_total": n_shards})
        dist.barrier()
        result = {}
        if self.layout.rank == 0:
            if self.spec.entropy:
                result["entropy"] = self.entropy_sink.publish(n_shards, np.asarray(tokens.sequence_lengths))
            result = {**self.sink.publish(n_shards, np.asarray(tokens.sequence_lengths)), **result}
        dist.barrier()
        self.on_event("done", result)
        return result


def _document_values(docs: dict[int, np.ndarray], windows: list[Window], losses) -> dict[int, np.ndarray]:
    """{document: float32 [length]} from the windows' losses (every position is scored exactly once;
    NaN would mark one that was not)."""
    values = {d: np.full(len(t), np.nan, dtype=np.float32) for d, t in docs.items()}
    for w, loss in zip(windows, losses):
        values[w.document][w.doc_positions.start:w.doc_positions.stop] = loss.numpy()
    return values


def _document(tokens, doc_index: np.ndarray, d: int) -> np.ndarray:
    first, last = int(doc_index[d]), int(doc_index[d + 1])
    parts = [tokens[j] for j in range(first, last)]
    return np.concatenate(parts) if len(parts) != 1 else parts[0]
