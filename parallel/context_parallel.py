"""The one home of context parallelism's sequence layout (megatron-core's load-balanced split).

Each of the ``cp`` ranks of a context-parallel group holds two of the 2·cp equal chunks of every
sequence: chunks ``r`` and ``2·cp - 1 - r`` (causal attention's work is then the same on every
rank). ``megatron.core.utils.get_batch_on_this_cp_rank`` cuts a micro-batch this way; the helpers
here name positions in that layout and put a rank's pieces back together where a decision needs
the whole sequence (attention's keys and values, the selection's top-k).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def chunk_positions(cp: int, cp_rank: int, chunk: int, device=None) -> torch.Tensor:
    """Positions in the whole sequence of a CP rank's ``2 * chunk`` tokens."""
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    return torch.cat([first, first + (2 * cp - 1 - 2 * cp_rank) * chunk])


def _in_order(parts: torch.Tensor, dim: int) -> torch.Tensor:
    """[cp, ..., s_local (at ``dim`` + 1), ...] gathered from the ranks -> the whole sequence along
    ``dim``: rank j's first half is chunk j, its second half chunk 2·cp - 1 - j."""
    cp, chunk = parts.shape[0], parts.shape[dim + 1] // 2
    order = [(j, 0) for j in range(cp)] + [(j, 1) for j in reversed(range(cp))]
    return torch.cat([parts[j].narrow(dim, h * chunk, chunk) for j, h in order], dim=dim)


def whole_sequences(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """This rank's [.., s_local, ..] (sequence along ``dim``) -> every rank's, the whole sequence in
    order (no gradient)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return _in_order(torch.stack(parts), dim)


def own_chunks(whole: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """The inverse of ``whole_sequences`` for one rank: its two chunks of the whole sequence."""
    chunk = whole.shape[dim] // (2 * cp)
    return whole.index_select(dim, chunk_positions(cp, cp_rank, chunk, whole.device))


class GatherSequence(torch.autograd.Function):
    """``whole_sequences`` along dim 0 with a gradient: backward sums, over the ranks, the gradient
    of each rank's share and hands each rank its own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.cp, ctx.rank = group, dist.get_world_size(group), dist.get_rank(group)
        return whole_sequences(x, group, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return own_chunks(grad, ctx.cp, ctx.rank, dim=0), None


#: a micro-batch key with this prefix holds values already cut to this CP rank's chunks (the online
#: reference model's losses, computed on the split batch): ``split_for_context_parallel`` passes it
#: through under its plain name
LOCAL_PREFIX = "cp_local:"
#: keys of a micro-batch that are not [b, s] (``[b]`` sample indices): never split
NOT_SEQUENCE_KEYS = ("samples",)


def split_for_context_parallel(batch: dict) -> dict:
    """Each [b, s] tensor of a micro-batch cut to this CP rank's chunks (unchanged without CP);
    ``LOCAL_PREFIX`` keys, already cut, lose their prefix."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    local = {k[len(LOCAL_PREFIX):]: v for k, v in batch.items() if k.startswith(LOCAL_PREFIX)}
    kept = {k: v for k, v in batch.items() if k in NOT_SEQUENCE_KEYS}
    rest = {k: v for k, v in batch.items() if not k.startswith(LOCAL_PREFIX) and k not in NOT_SEQUENCE_KEYS}
    if ps.get_context_parallel_world_size() > 1:
        rest = get_batch_on_this_cp_rank(rest)
    return {**rest, **kept, **local}
