"""Per-token loss (and entropy) from a model's final hidden states, without a ``[tokens, vocab]`` tensor.

``OutputStats`` is what the scorer (``parallel.scorer``) and the online reference model
(``parallel.reference``) put after a frozen GPTModel's last stage: the model is told to return its
final (normed) hidden states (``post_process`` off after the build), and the vocab-parallel output
layer is applied here, to the rows asked for only, in blocks of rows x vocabulary that stay in cache
on the CPU (whole rows, at most ``GPU_LOGITS_ELEMENTS`` logits at a time, on a GPU). Each block is
reduced to (logsumexp, target logit) per row by cuda_ext's fused ``row_stats`` kernel; blocks of the
vocabulary and TP ranks combine exactly (``cuda_ext.tp``: one all-gather of two numbers per row, no
full-vocabulary gather). Values equal the training loss path's (``cuda_ext.per_token_loss``) up to
fp32 summation order. No gradient: forward only.
"""

from __future__ import annotations

import torch

from parallel.model import padded_vocab_columns

#: on CPU the output layer's logits are made CPU_ROW_BLOCK rows x CPU_VOCAB_BLOCK ids at a time
#: (measured on the tiny model, 32k vocabulary: 15-20 % faster than whole rows, 2x faster than
#: materialising a micro-batch's logits)
CPU_ROW_BLOCK = 512
CPU_VOCAB_BLOCK = 4096
#: on a GPU, logits of at most this many elements at a time (whole rows)
GPU_LOGITS_ELEMENTS = 1 << 28


class OutputStats:
    """The output layer of ``model`` (the last pipeline stage's GPTModel) as per-token statistics.

    ``model`` returns its final hidden states from now on (``post_process`` is turned off); call this
    object with them. ``vocab_size`` is the true vocabulary (the padding rows take no part);
    ``sequence_parallel``: the hidden states hold 1/tp of the sequence on each TP rank; ``entropy``:
    also the entropy of the next-token distribution."""

    def __init__(self, model, vocab_size: int, tp: int, sequence_parallel: bool = False, entropy: bool = False):
        # tied embeddings: the output layer has no weight of its own on a first stage (megatron's
        # shared_embedding_or_output_weight is the embedding there, the synced copy elsewhere)
        self.weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                       else model.output_layer.weight)
        model.post_process = False
        self.vocab_size = vocab_size
        self.tp = tp
        self.sequence_parallel = sequence_parallel
        self.entropy = entropy
        self._row_stats = None

    def __call__(self, hidden: torch.Tensor, rows: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h] (sequence-first; [s/tp, b, h] under sequence parallelism) -> per-row
        losses [n] (fp32), or [n, 2] (loss, entropy) with ``entropy``. ``rows``: flat indices into
        the [s*b, h] hidden states (position p of batch row r is row p*b + r), None: every row;
        ``labels`` [n]: the target of each row."""
        from megatron.core import parallel_state as ps

        if self.sequence_parallel:  # [s/tp, b, h] on each TP rank -> the whole sequence
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        h = hidden.reshape(-1, hidden.shape[-1])
        if rows is not None:
            h = h.index_select(0, rows)
        weight = self.weight
        n, v_local = h.shape[0], weight.shape[0]
        vocab_start = ps.get_tensor_model_parallel_rank() * v_local
        # the vocabulary's padding rows take no part, as in the training loss
        # (parallel.model.padded_vocab_columns), so that loss - score compares like with like and a
        # HF model's score is its own cross-entropy
        weight = weight[:padded_vocab_columns(self.vocab_size, vocab_start, v_local)[0]]
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
        if self.tp > 1:
            from cuda_ext.tp import gather_row_stats

            lse, target = gather_row_stats(lse, target, ps.get_tensor_model_parallel_group())
        if not self.entropy:
            return lse - target
        return torch.stack([lse - target, self._entropies(h, weight)], dim=1)

    def _entropies(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The entropy of the next-token distribution per row [n]: H = lse - E_p[logit], from
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
        if self.tp > 1:
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


def _row_stats_kernel(device: torch.device, dtype: torch.dtype):
    """cuda_ext's ``row_stats`` implementation for this device, called directly: forward-only scoring
    needs no autograd, and the custom op's wrapper costs a torch._dynamo import and ~30 us a call."""
    from cuda_ext import dispatch
    from cuda_ext.reference import row_stats_reference

    choice = dispatch.choose(torch.device(device), dtype)
    if choice.backend == "torch":
        return row_stats_reference
    return dispatch.extension(choice.backend).row_stats
