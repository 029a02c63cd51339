"""The one logsumexp combine: per-row statistics of vocabulary parts -> statistics of the whole row.

A row's logits may be split over tensor-parallel ranks (each holds ``vocab/tp`` columns) or, on one
rank, computed in vocabulary blocks (the scorer, to stay in cache). Either way each part gives its
local ``(logsumexp, target logit)``, the target logit being 0 in every part that does not hold the
target, and the whole row's are::

    lse    = logsumexp over parts of lse_part
    target = sum over parts of target_part

``gather_row_stats`` does it across a TP group with ONE all-gather of a [2, tokens] tensor (as
flash-attn's cross-entropy does); its backward hands each rank the gradient of its own part, which
is already complete there because every rank computes the same objective from the gathered values.
"""

from __future__ import annotations

import torch


def merge_row_stats(lse_parts: torch.Tensor, target_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lse_parts, target_parts: [parts, tokens] -> (lse [tokens], target logit [tokens])."""
    return torch.logsumexp(lse_parts, dim=0), target_parts.sum(dim=0)


class _GatherOwnGrad(torch.autograd.Function):
    """All-gather along a new leading dim; backward returns the gradient of this rank's slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        import torch.distributed as dist

        ctx.rank = dist.get_rank(group)
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, tensor.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


def gather_row_stats(lse_local: torch.Tensor, target_local: torch.Tensor, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (lse, target logit) [tokens] of its vocabulary shard -> the whole row's, identical on
    every rank of ``tp_group``; differentiable (see the module docstring)."""
    stats = _GatherOwnGrad.apply(torch.stack([lse_local, target_local]), tp_group)  # [tp, 2, tokens]
    return merge_row_stats(stats[:, 0], stats[:, 1])
