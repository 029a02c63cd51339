"""``rho score`` on each rank: the reference model forward only, per-token losses into a score store.

Documents are cut into windows (``parallel.windows.document_windows``). A shard's windows are sorted by
length and packed ``micro_batch_size`` at a time (default: ``default_micro_batch_size``), each
micro-batch padded only to its longest window (rounded up to ``PAD_MULTIPLE``); megatron's
forward-only schedule runs them through the TP/PP model, one call per run of equal-shape
micro-batches. The last stage's GPTModel returns its final hidden
states (``post_process`` is turned off after loading), and ``Scorer._scored_losses`` applies the
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
from parallel.model import ModelShape, build_model, model_shape, padded_vocab_columns
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


#: on CPU the output layer's logits are made CPU_ROW_BLOCK rows x CPU_VOCAB_BLOCK ids at a time
#: (measured on the tiny model, 32k vocabulary: 15-20 % faster than whole rows, 2x faster than
#: materialising a micro-batch's logits)
CPU_ROW_BLOCK = 512
CPU_VOCAB_BLOCK = 4096
#: on a GPU, logits of at most this many elements at a time (whole rows)
GPU_LOGITS_ELEMENTS = 1 << 28
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
        if self.is_last:
            # GPTModel then returns the final (normed) hidden states [s, b, h]; the output layer is
            # applied by _scored_losses to the scored positions only
            # tied embeddings: the output layer has no weight of its own on a first stage (megatron's
            # shared_embedding_or_output_weight is the embedding there, the synced copy elsewhere)
            self.output_weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                                  else model.output_layer.weight)
            model.post_process = False
        self._row_stats = None
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
                hidden = self._scored_losses(hidden, mb.rows.to(device), mb.labels.to(device))

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

    def _scored_losses(self, hidden: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token losses of the scored positions only.

        Final hidden states [s, b, h] -> the scored rows -> this rank's slice of the output layer ->
        (logsumexp, target logit) per row with the fused ``row_stats`` kernel -> one all-gather of
        those two numbers per row across TP. Positions a window only uses as context never reach
        the output layer. On CPU the logits are made in blocks of rows x vocabulary that stay in
        cache (the logsumexp of the blocks is combined exactly as TP ranks' are); on a GPU whole
        rows, at most ``GPU_LOGITS_ELEMENTS`` logits at a time.
        """
        from megatron.core import parallel_state as ps

        if self.spec.sequence_parallel:  # [s/tp, b, h] on each TP rank -> the whole sequence
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        weight = self.output_weight
        n, v_local = h.shape[0], weight.shape[0]
        vocab_start = ps.get_tensor_model_parallel_rank() * v_local
        # the vocabulary's padding rows take no part, as in the training loss
        # (parallel.model.padded_vocab_columns), so that loss - score compares like with like and a
        # HF model's score is its own cross-entropy
        weight = weight[:padded_vocab_columns(self.shape.vocab_size, vocab_start, v_local)[0]]
        v_local = weight.shape[0]
        if v_local == 0:  # a TP rank holding padding only: it adds nothing to the logsumexp
            lse_parts, target_parts = [torch.full((n,), float("-inf"), device=h.device)], [torch.zeros(n, device=h.device)]
        elif h.device.type == "cpu":
            row_block = -(-n // max(1, -(-n // CPU_ROW_BLOCK)))  # even blocks of at most CPU_ROW_BLOCK
            lse_parts, target_parts = self._row_stats_blocks(h, labels, weight, vocab_start, row_block, CPU_VOCAB_BLOCK)
        else:
            row_block = max(1, GPU_LOGITS_ELEMENTS // v_local)
            lse_parts, target_parts = self._row_stats_blocks(h, labels, weight, vocab_start, row_block, v_local)
        lse, target = torch.cat(lse_parts), torch.cat(target_parts)
        if self.layout.tp > 1:
            from cuda_ext.tp import gather_row_stats

            lse, target = gather_row_stats(lse, target, ps.get_tensor_model_parallel_group())
        if not self.spec.entropy:
            return lse - target
        return torch.stack([lse - target, self._entropies(h, weight)], dim=1)

    def _entropies(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The entropy of the next-token distribution per scored row [n]: H = lse - E_p[logit], from
        (logsumexp, expected logit) of cache-sized blocks of the vocabulary (and of TP shards), merged
        exactly like the loss's logsumexp (``merge_expectations``). fp32 throughout."""
        from megatron.core import parallel_state as ps

        n = h.shape[0]
        if weight.shape[0] == 0:  # a TP rank holding padding only
            lse, expected = torch.full((n,), float("-inf"), device=h.device), torch.zeros(n, device=h.device)
        else:
            block = CPU_VOCAB_BLOCK if h.device.type == "cpu" else weight.shape[0]
            rows = CPU_ROW_BLOCK if h.device.type == "cpu" else max(1, GPU_LOGITS_ELEMENTS // weight.shape[0])
            lse_rows, expected_rows = [], []
            for r in range(0, n, rows):
                parts = [logit_expectation(torch.nn.functional.linear(h[r:r + rows], weight[v:v + block]))
                         for v in range(0, weight.shape[0], block)]
                lse_r, e_r = merge_expectations(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
                lse_rows.append(lse_r)
                expected_rows.append(e_r)
            lse, expected = torch.cat(lse_rows), torch.cat(expected_rows)
        if self.layout.tp > 1:
            import torch.distributed as dist

            group = ps.get_tensor_model_parallel_group()
            stats = [torch.empty(2, n, device=h.device) for _ in range(dist.get_world_size(group))]
            dist.all_gather(stats, torch.stack([lse, expected]).contiguous(), group=group)
            lse, expected = merge_expectations(torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]))
        return lse - expected

    def _row_stats_blocks(self, h, labels, weight, vocab_start: int, row_block: int, vocab_block: int):
        """(logsumexp, target logit) of ``h @ weight.T`` per row, made ``row_block`` x ``vocab_block``
        logits at a time; blocks of the vocabulary combine like TP shards (``cuda_ext.tp``)."""
        from cuda_ext.tp import merge_row_stats

        if self._row_stats is None:
            self._row_stats = _row_stats_kernel(h.device, weight.dtype)
        lse_parts, target_parts = [], []
        for r in range(0, h.shape[0], row_block):
            hr, lr = h[r:r + row_block], labels[r:r + row_block]
            lse_v, target_v = [], []
            for v in range(0, weight.shape[0], vocab_block):
                lse, t = self._row_stats(torch.nn.functional.linear(hr, weight[v:v + vocab_block]), lr, vocab_start + v)
                lse_v.append(lse)
                target_v.append(t)
            lse, target = (lse_v[0], target_v[0]) if len(lse_v) == 1 else merge_row_stats(torch.stack(lse_v), torch.stack(target_v))
            lse_parts.append(lse)
            target_parts.append(target)
        return lse_parts, target_parts

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


def logit_expectation(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, v] -> (logsumexp [n], expected logit under the softmax [n]), fp32."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    return lse, (torch.exp(z - lse[:, None]) * z).sum(dim=-1)


def merge_expectations(lse_parts: torch.Tensor, expected_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[parts, n] (logsumexp, expected logit) of disjoint vocabulary parts -> the whole row's: each
    part's expectation weighted by its share of the probability mass, exp(lse_part - lse)."""
    lse = torch.logsumexp(lse_parts, dim=0)
    return lse, (torch.exp(lse_parts - lse) * expected_parts).sum(dim=0)


def _document_values(docs: dict[int, np.ndarray], windows: list[Window], losses) -> dict[int, np.ndarray]:
    """{document: float32 [length]} from the windows' losses (every position is scored exactly once;
    NaN would mark one that was not)."""
    values = {d: np.full(len(t), np.nan, dtype=np.float32) for d, t in docs.items()}
    for w, loss in zip(windows, losses):
        values[w.document][w.doc_positions.start:w.doc_positions.stop] = loss.numpy()
    return values


def _row_stats_kernel(device: torch.device, dtype: torch.dtype):
    """cuda_ext's ``row_stats`` implementation for this device, called directly: scoring needs no
    autograd, and the custom op's wrapper costs a torch._dynamo import and ~30 us a call."""
    from cuda_ext import dispatch
    from cuda_ext.reference import row_stats_reference

    choice = dispatch.choose(torch.device(device), dtype)
    if choice.backend == "torch":
        return row_stats_reference
    return dispatch.extension(choice.backend).row_stats


def _document(tokens, doc_index: np.ndarray, d: int) -> np.ndarray:
    first, last = int(doc_index[d]), int(doc_index[d + 1])
    parts = [tokens[j] for j in range(first, last)]
    return np.concatenate(parts) if len(parts) != 1 else parts[0]
