"""The specification of rho's fused selective loss, in plain PyTorch (any dtype, float64 included).

For token i with logits z_i (this TP rank holds the vocabulary shard starting at vocab_start_index),
target y_i (a global id), stored reference loss r_i and loss_mask m_i::

    loss_i   = logsumexp(z_i) - z_i[y_i]           (over the whole vocabulary: all TP shards)
    excess_i = loss_i - r_i
    kept     = the top k candidates (m_i > 0) by excess, per selection segment
    L        = sum_i loss_i * kept_i / max(n_kept, 1)

Selection segments are consecutive runs of ``segment_len`` tokens (one sequence, for the
``sequence`` scope) or all tokens (``segment_len=None``). In a segment with n candidates,
``k = floor(ratio * n + 0.5)`` (round half up): ratio 1 keeps every candidate, ratio 0 none.
Ties are broken deterministically: larger excess first, then the lower token index; a NaN excess
ranks below every number. Masked tokens are never kept and never counted.

The gradient of L with respect to the local logits is ``(softmax(z_i) - onehot(y_i)) * kept_i / n_kept``:
``loss`` is differentiable, ``kept`` and ``n_kept`` are not. With n_kept = 0 the loss is 0 and so is
the gradient (no NaN). With ratio 1 this is exactly the mean cross-entropy over the masked tokens.

Under tensor parallelism every rank gets the same ``loss``, ``kept`` and ``n_kept``; each rank's
gradient is the slice of the full-vocabulary gradient for its own shard.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from cuda_ext.tp import gather_row_stats


class SelectiveLoss(NamedTuple):
    #: per-token cross-entropy [tokens], float32 (float64 for float64 logits), same on all TP ranks
    loss: torch.Tensor
    #: which tokens are selected [tokens], bool
    kept: torch.Tensor
    #: number of kept tokens, int64 scalar tensor
    n_kept: torch.Tensor

    def mean_kept_loss(self) -> torch.Tensor:
        """The training objective: sum of kept losses / max(n_kept, 1)."""
        return (self.loss * self.kept).sum() / self.n_kept.clamp(min=1)


def selection_k(n_candidates: int, ratio: float) -> int:
    """How many of ``n_candidates`` a segment keeps: floor(ratio * n + 0.5), within [0, n]."""
    return min(n_candidates, max(0, int(math.floor(ratio * n_candidates + 0.5))))


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"selection ratio must be in [0, 1], got {ratio}")


def topk_mask_reference(excess: torch.Tensor, candidate: torch.Tensor, ratio: float, segment_len: int | None) -> torch.Tensor:
    """kept [tokens] bool: per segment, the top-k candidates by excess (ties: lower index)."""
    _check_ratio(ratio)
    tokens = excess.numel()
    seg = tokens if segment_len is None else int(segment_len)
    if seg <= 0 or (tokens and tokens % seg):
        raise ValueError(f"tokens ({tokens}) must be a multiple of the segment length ({seg})")
    kept = torch.zeros(tokens, dtype=torch.bool, device=excess.device)
    if tokens == 0:
        return kept
    keys = excess.detach().to(torch.float64).reshape(-1, seg).clone()
    keys[torch.isnan(keys)] = -math.inf
    cand = candidate.reshape(-1, seg).to(torch.bool)
    for s in range(keys.shape[0]):
        idx = torch.nonzero(cand[s], as_tuple=False).flatten()
        k = selection_k(idx.numel(), ratio)
        if k == 0:
            continue
        # stable sort, descending: equal keys keep index order, so the lower index wins a tie
        order = torch.sort(keys[s, idx], descending=True, stable=True).indices
        kept[s * seg + idx[order[:k]]] = True
    return kept


def row_stats_reference(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local logsumexp, local target logit or 0), both [tokens], in float32 (float64 for float64)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    lse = torch.logsumexp(z, dim=-1)
    local = targets - vocab_start
    inside = (local >= 0) & (local < z.shape[-1])
    picked = torch.gather(z, -1, local.clamp(0, max(z.shape[-1] - 1, 0)).unsqueeze(-1)).squeeze(-1)
    return lse, torch.where(inside, picked, torch.zeros_like(picked))


def grad_logits_reference(logits, targets, vocab_start, lse, grad_loss) -> torch.Tensor:
    """(softmax(z) - onehot(y)) * grad_loss for the local shard, in the logits' dtype."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    grad = torch.exp(z - lse.to(acc).unsqueeze(-1))
    local = targets - vocab_start
    inside = (local >= 0) & (local < z.shape[-1])
    rows = torch.nonzero(inside, as_tuple=False).flatten()
    grad[rows, local[rows]] -= 1.0
    return (grad * grad_loss.to(acc).unsqueeze(-1)).to(logits.dtype)


def selective_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    ratio: float,
    segment_len: int | None = None,
    vocab_start_index: int = 0,
    tp_group=None,
) -> SelectiveLoss:
    """The spec, differentiable through ``loss``. logits: [tokens, vocab/tp]; the rest: [tokens]."""
    _check_ratio(ratio)
    lse, target_logit = row_stats_reference(logits, targets, vocab_start_index)  # differentiable
    if tp_group is not None:
        lse, target_logit = gather_row_stats(lse, target_logit, tp_group)
    loss = lse - target_logit
    excess = loss.detach() - ref_loss.to(loss.dtype)
    kept = topk_mask_reference(excess, loss_mask > 0, ratio, segment_len)
    return SelectiveLoss(loss=loss, kept=kept, n_kept=kept.sum())
