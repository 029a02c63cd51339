"""The fused selective loss as torch.library custom ops, with autograd and fake (meta) kernels.

    from cuda_ext import selective_loss
    out = selective_loss(logits, targets, ref_loss, loss_mask, ratio=0.6, segment_len=seq_len,
                         vocab_start_index=tp_rank * vocab_local, tp_group=tp_group)
    out.mean_kept_loss().backward()

Building blocks (each dispatched to the cuda / cpu / torch implementation by ``cuda_ext.dispatch``):

* ``rho::row_stats(logits, targets, vocab_start) -> (lse_local, target_logit_local)``: one read of the
  logits, O(tokens) saved;
* ``rho::grad_logits(logits, targets, vocab_start, lse, grad_loss) -> grad`` and its in-place twin
  ``rho::grad_logits_``: one read and one write of the logits;
* ``rho::topk_mask(excess, candidate, ratio, segment_len) -> kept``;
* ``rho::cross_entropy(logits, targets) -> (loss, lse)``: the TP=1 per-token loss as one op with a
  registered autograd formula (composes with torch.compile).

Under tensor parallelism the per-row statistics of all ranks are combined with ONE all-gather of a
[2, tokens] tensor (local logsumexp, local target logit; ``cuda_ext.tp``), as flash-attn's
cross-entropy does; the backward needs no collective: each rank already holds the global logsumexp.
"""

from __future__ import annotations

import torch

from cuda_ext import dispatch
from cuda_ext import reference as ref
from cuda_ext.reference import SelectiveLoss
from cuda_ext.tp import gather_row_stats

# ---------------------------------------------------------------------------- building blocks


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("rho::row_stats", mutates_args=())
def row_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    choice = dispatch.choose(logits.device, logits.dtype)
    if choice.backend == "torch":
        return ref.row_stats_reference(logits, targets, vocab_start)
    lse, tl = dispatch.extension(choice.backend).row_stats(logits, targets, vocab_start)
    return lse, tl


@row_stats.register_fake
def _(logits, targets, vocab_start):
    acc = _acc_dtype(logits.dtype)
    return logits.new_empty(logits.shape[:1], dtype=acc), logits.new_empty(logits.shape[:1], dtype=acc)


def _kernel_vector(t: torch.Tensor) -> torch.Tensor:
    """A per-token vector as both compiled kernels take it: fp32, contiguous. The CPU glue converts
    too; the CUDA glue checks and refuses, so e.g. the stride-0 ``grad_loss`` of ``loss.sum()`` or a
    float64 excess would fail there while the CPU passed."""
    return t.to(torch.float32).contiguous()


@torch.library.custom_op("rho::grad_logits", mutates_args=())
def grad_logits(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, lse: torch.Tensor,
                grad_loss: torch.Tensor) -> torch.Tensor:
    choice = dispatch.choose(logits.device, logits.dtype)
    if choice.backend == "torch":
        return ref.grad_logits_reference(logits, targets, vocab_start, lse, grad_loss)
    return dispatch.extension(choice.backend).grad_logits(logits, targets, vocab_start, _kernel_vector(lse),
                                                          _kernel_vector(grad_loss), False)


@grad_logits.register_fake
def _(logits, targets, vocab_start, lse, grad_loss):
    return torch.empty_like(logits)


@torch.library.custom_op("rho::grad_logits_", mutates_args=("logits",))
def grad_logits_(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, lse: torch.Tensor,
                 grad_loss: torch.Tensor) -> None:
    """In place: the logits' memory becomes their gradient (saves one logits-sized buffer)."""
    choice = dispatch.choose(logits.device, logits.dtype)
    if choice.backend == "torch":
        logits.copy_(ref.grad_logits_reference(logits, targets, vocab_start, lse, grad_loss))
    else:
        dispatch.extension(choice.backend).grad_logits(logits, targets, vocab_start, _kernel_vector(lse),
                                                       _kernel_vector(grad_loss), True)


@grad_logits_.register_fake
def _(logits, targets, vocab_start, lse, grad_loss):
    return None


@torch.library.custom_op("rho::topk_mask", mutates_args=())
def topk_mask(excess: torch.Tensor, candidate: torch.Tensor, ratio: float, segment_len: int) -> torch.Tensor:
    """segment_len 0 means one segment over all tokens."""
    seg = segment_len or excess.numel()
    if excess.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=excess.device)
    choice = dispatch.choose(excess.device, torch.float32)
    if choice.backend == "torch":
        return ref.topk_mask_reference(excess, candidate, ratio, seg)
    return dispatch.extension(choice.backend).topk_mask(_kernel_vector(excess), candidate.to(torch.bool).contiguous(),
                                                        float(ratio), int(seg))


@topk_mask.register_fake
def _(excess, candidate, ratio, segment_len):
    return torch.empty(excess.shape, dtype=torch.bool, device=excess.device)


# ----------------------------------------------------------------- per-token loss with autograd


@torch.library.custom_op("rho::cross_entropy", mutates_args=())
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE over the full vocabulary (TP=1): (loss [tokens], logsumexp [tokens])."""
    lse, target_logit = row_stats(logits, targets, 0)
    return lse - target_logit, lse


@cross_entropy.register_fake
def _(logits, targets):
    acc = _acc_dtype(logits.dtype)
    return logits.new_empty(logits.shape[:1], dtype=acc), logits.new_empty(logits.shape[:1], dtype=acc)


def _ce_setup_context(ctx, inputs, output):
    logits, targets = inputs
    _, lse = output
    ctx.save_for_backward(logits, targets, lse)


def _ce_backward(ctx, grad_loss, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return grad_logits(logits, targets, 0, lse, grad_loss), None


torch.library.register_autograd("rho::cross_entropy", _ce_backward, setup_context=_ce_setup_context)


class _VocabParallelCE(torch.autograd.Function):
    """Per-token CE with the vocabulary sharded over ``tp_group``: one all-gather forward, none backward."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, tp_group, inplace_backward):
        lse_local, target_local = row_stats(logits, targets, vocab_start)
        lse, target_logit = gather_row_stats(lse_local, target_local, tp_group)  # whole rows, every rank
        loss = lse - target_logit
        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab_start = vocab_start
        ctx.inplace = inplace_backward
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad_loss = grad_loss.contiguous()
        if ctx.inplace:
            grad_logits_(logits, targets, ctx.vocab_start, lse, grad_loss)
            return logits, None, None, None, None
        return grad_logits(logits, targets, ctx.vocab_start, lse, grad_loss), None, None, None, None


class _LocalCEInplace(torch.autograd.Function):
    """TP=1 per-token CE whose backward writes the gradient into the logits' memory."""

    @staticmethod
    def forward(ctx, logits, targets):
        lse, target_logit = row_stats(logits, targets, 0)
        ctx.save_for_backward(logits, targets, lse)
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad_logits_(logits, targets, 0, lse, grad_loss.contiguous())
        return logits, None


def per_token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start_index: int = 0,
    tp_group=None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Differentiable per-token cross-entropy [tokens] (fp32) of vocab-sharded logits [tokens, vocab/tp].

    The fused forward/backward of ``selective_loss`` without the selection, for callers that select
    tokens themselves (e.g. across data-parallel ranks). Same value on every TP rank.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, vocab_local], got shape {tuple(logits.shape)}")
    targets = targets.reshape(-1).to(torch.int64)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if tp_group is not None:
        return _VocabParallelCE.apply(logits, targets, int(vocab_start_index), tp_group, inplace_backward)
    if inplace_backward:
        return _LocalCEInplace.apply(logits, targets)
    loss, _ = cross_entropy(logits, targets)
    return loss


def selective_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    ratio: float,
    segment_len: int | None = None,
    vocab_start_index: int = 0,
    tp_group=None,
    inplace_backward: bool = False,
) -> SelectiveLoss:
    """The fused selective loss (semantics: ``cuda_ext.reference``). logits: [tokens, vocab/tp].

    ``inplace_backward=True`` lets backward overwrite ``logits`` with their gradient (the caller must
    not use the logits after backward; megatron's own vocab-parallel CE does the same).
    """
    ref._check_ratio(ratio)
    loss = per_token_loss(logits, targets, vocab_start_index, tp_group, inplace_backward)
    excess = (loss.detach() - ref_loss.reshape(-1).to(loss.dtype)).to(torch.float32 if loss.dtype != torch.float64 else torch.float64)
    seg = 0 if segment_len is None else int(segment_len)
    if seg and loss.numel() % seg:
        raise ValueError(f"tokens ({loss.numel()}) must be a multiple of segment_len ({seg})")
    kept = topk_mask(excess, loss_mask.reshape(-1) > 0, float(ratio), seg)
    return SelectiveLoss(loss=loss, kept=kept, n_kept=kept.sum())
