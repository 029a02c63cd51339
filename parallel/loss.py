"""The language-model loss of rho's engine: per-token losses from the fused kernel, and selection.

``token_losses`` runs the model; on the last pipeline stage the model turns its vocab-parallel logits
``[s, b, vocab/tp]`` into per-token cross-entropy ``[b, s]`` with ``cuda_ext.per_token_loss`` (one
all-gather of per-row statistics across TP, backward written into the logits' memory). Plain causal
LM and selective LM share this path, so ``--select-ratio 1.0`` is plain training bit for bit.

``SelectiveLoss`` (the ``loss_func`` megatron's schedule calls per micro-batch) keeps the tokens to
train on and returns megatron's ``(loss_sum, num_tokens, report)``: the schedule sums the kept counts
over micro-batches and ``finalize_model_grads`` divides by their total over DP ranks, so the loss is
exactly the mean over every kept token of the global batch.

Selection scopes (Rho-1 ranks tokens "in a batch"; exact global-batch top-k is impossible under 1F1B,
where a micro-batch's backward starts before later micro-batches exist):

* ``sequence`` (default): top k% of each sequence's candidate tokens. Exact, no communication, and
  independent of micro-batching and the DP size, so a run reproduces across layouts.
* ``microbatch``: top k% over the micro-batch, across the DP group (one all-gather of the excess).
* ``batch``: tokens whose excess reaches a threshold: the (1 - k) quantile of the excess over the
  previous global batch (all micro-batches, all DP ranks). The first step uses ``microbatch``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from parallel.context_parallel import own_chunks, whole_sequences

Scope = Literal["sequence", "microbatch", "batch"]

# report layout (float64 sums over tokens; reduced over micro-batches and DP for logging)
#: Selection ranks the excess rounded to this many nats. fp32 reductions differ between TP sizes by
#: ~1e-7 (row-parallel all-reduce order), which would flip near-ties at the k-th place and make a
#: TP2 run select other tokens than a TP1 run; on a 1/1024-nat grid the ranking is the same unless a
#: value sits within ~1e-7 of a grid edge at the boundary, and ties on the grid go to the lower index.
EXCESS_QUANTUM = 1.0 / 1024

REPORT_FIELDS = ("kept_loss_sum", "kept", "loss_sum", "tokens", "ref_sum", "excess_sum", "kept_ref_sum")


def token_losses(model, batch: dict[str, torch.Tensor]):
    """Forward one micro-batch; the last stage returns per-token losses [b, s] (fp32), computed by
    the model itself from its sequence-first logits (``parallel.model._rho_gpt_model_class``)."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    tokens = batch["tokens"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    # earlier stages ignore labels and return hidden states for the next stage
    return model(tokens, position_ids, attention_mask=None, labels=labels)


@dataclasses.dataclass
class Selection:
    """What to train on: None ratio = every unmasked token (plain causal LM)."""

    ratio: float | None = None
    scope: Scope = "sequence"
    #: batch scope: the excess threshold carried from the previous global batch
    threshold: float | None = None
    _step_excess: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def selective(self) -> bool:
        return self.ratio is not None

    def kept(self, losses: torch.Tensor, ref_loss: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """kept [b, s] bool for one micro-batch (identical on every TP rank)."""
        from cuda_ext import topk_mask

        candidate = mask > 0
        if not self.selective:
            return candidate
        excess = (losses.detach() - ref_loss.to(losses.dtype)).float()
        excess = torch.round(excess / EXCESS_QUANTUM) * EXCESS_QUANTUM
        if self.scope == "batch":
            self._step_excess.append(torch.where(candidate, excess, torch.full_like(excess, float("nan"))).reshape(-1))
            if self.threshold is not None:
                return candidate & (excess >= self.threshold)
        # under context parallelism a rank holds two chunks of each sequence: the top-k is taken over
        # the whole sequences (gathered in order, so ties fall as without CP), each rank keeps its part
        cp = _cp()
        if cp is not None:
            excess = whole_sequences(excess, cp[0])
            candidate = whole_sequences(candidate.to(torch.uint8), cp[0]) > 0  # gloo gathers no bool
        if self.scope == "sequence":
            kept = topk_mask(excess.reshape(-1), candidate.reshape(-1), float(self.ratio), excess.shape[1])
            kept = kept.view_as(candidate)
        else:
            kept = self._across_dp(excess, candidate)
        return kept if cp is None else own_chunks(kept, cp[1], cp[2])

    def _across_dp(self, excess: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from cuda_ext import topk_mask

        group = ps.get_data_parallel_group()
        world = dist.get_world_size(group)
        flat = torch.stack([excess.reshape(-1), candidate.reshape(-1).float()])  # [2, b*s]
        if world > 1:
            parts = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(parts, flat, group=group)
            flat_all = torch.cat(parts, dim=1)
        else:
            flat_all = flat
        kept_all = topk_mask(flat_all[0].contiguous(), flat_all[1] > 0, float(self.ratio), 0)
        n = excess.numel()
        rank = dist.get_rank(group) if world > 1 else 0
        return kept_all[rank * n:(rank + 1) * n].view_as(candidate)

    def end_step(self) -> None:
        """Batch scope: the next step's threshold from this step's excess over all DP ranks."""
        if not (self.selective and self.scope == "batch") or not self._step_excess:
            self._step_excess.clear()
            return
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        local = torch.cat(self._step_excess)
        self._step_excess.clear()
        group = ps.get_data_parallel_group(with_context_parallel=True)  # every token of the batch
        world = dist.get_world_size(group)
        if world > 1:
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local, group=group)
            local = torch.cat(parts)
        values = local[~torch.isnan(local)]
        if values.numel():
            # the k-th largest excess, k as the selection rounds it: the next step keeps >= it
            from cuda_ext import selection_k

            k = selection_k(values.numel(), float(self.ratio))
            self.threshold = (
                float("inf") if k == 0 else float(torch.kthvalue(values, values.numel() - k + 1).values.item())
            )


def _cp():
    """(group, size, rank) of this rank's context-parallel group, or None without CP."""
    from megatron.core import parallel_state as ps

    size = ps.get_context_parallel_world_size()
    # 0 before megatron's groups exist (unit tests of the selection alone)
    return None if size <= 1 else (ps.get_context_parallel_group(), size, ps.get_context_parallel_rank())


def make_loss_func(selection: Selection, loss_mask: torch.Tensor, ref_loss: torch.Tensor | None):
    """megatron's loss_func for one micro-batch: (kept loss sum, kept count, report)."""

    def loss_func(losses: torch.Tensor):
        device = losses.device
        mask = loss_mask.to(device)
        ref = ref_loss.to(device) if ref_loss is not None else None
        kept = selection.kept(losses, ref, mask)
        keptf = kept.to(losses.dtype)
        kept_sum = torch.sum(losses * keptf)
        n_kept = kept.sum().to(torch.int)
        maskf = mask.to(losses.dtype)
        detached = losses.detach()
        ref_term = ref if ref is not None else torch.zeros_like(detached)
        report = torch.stack([
            kept_sum.detach().double(),
            keptf.sum().double(),
            (detached * maskf).sum().double(),
            maskf.sum().double(),
            (ref_term * maskf).sum().double(),
            ((detached - ref_term) * maskf).sum().double(),
            (ref_term * keptf).sum().double(),
        ])
        return kept_sum, n_kept, {"report": report}

    return loss_func


def summarize(report: list[float]) -> dict[str, float]:
    """Per-step metrics from the summed report (see REPORT_FIELDS)."""
    r = dict(zip(REPORT_FIELDS, report))
    kept, tokens = r["kept"], r["tokens"]
    dropped = tokens - kept
    out = {
        "loss": r["kept_loss_sum"] / kept if kept else float("nan"),
        "tokens": kept,
        "all_tokens_loss": r["loss_sum"] / tokens if tokens else float("nan"),
        "kept_fraction": kept / tokens if tokens else float("nan"),
    }
    if r["ref_sum"] or r["excess_sum"] != r["loss_sum"]:
        out.update(
            mean_excess=r["excess_sum"] / tokens if tokens else float("nan"),
            ref_loss=r["ref_sum"] / tokens if tokens else float("nan"),
            kept_loss=out["loss"],
            dropped_loss=(r["loss_sum"] - r["kept_loss_sum"]) / dropped if dropped else float("nan"),
            kept_ref_loss=r["kept_ref_sum"] / kept if kept else float("nan"),
        )
    return out
