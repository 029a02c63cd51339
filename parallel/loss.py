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

What a token is ranked by is the selection's ``score`` (``score_values``): the excess (Rho-1), the
reference loss or entropy alone, the training loss alone, a seeded random draw (the control), or two
of them combined (the tokens in both top-k sets, or in either). The fraction kept can follow a
schedule: every token for ``select_after`` steps, then a linear move from ``ratio_start`` to ``ratio``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from parallel.context_parallel import own_chunks, whole_sequences
from parallel.score_functions import parse_score, ratio_at

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
    # [b, 1, s, s] bool, True = hidden: packed documents kept apart (separate_documents); None: causal
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device, non_blocking=True)
    # earlier stages ignore labels and return hidden states for the next stage
    return model(tokens, position_ids, attention_mask=attention_mask, labels=labels)


def score_values(name: str, losses: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One score function's values [b, s] (fp32; higher is kept first):

    * ``excess``    = training loss - reference loss (Rho-1);
    * ``reference`` = - reference loss (what the reference model finds predictable: its clean text);
    * ``training``  = training loss (hard tokens first; no reference model);
    * ``entropy``   = - the reference model's entropy (where it is sure: ``rho score --entropy``);
    * ``random``    = uniform [0, 1), drawn per sample from the run's seed (the control).

    Values that depend on the training model's loss are rounded to ``EXCESS_QUANTUM``, so that
    layouts whose reductions differ in the last bits rank the same; store and random values are the
    same on every layout and are used as they are."""
    if name == "excess":
        values = losses.detach().float() - inputs["ref_loss"].float()
    elif name == "training":
        values = losses.detach().float()
    elif name == "reference":
        return -inputs["ref_loss"].float()
    elif name == "entropy":
        return -inputs["ref_entropy"].float()
    elif name == "random":
        return inputs["random"].float()
    else:
        raise ValueError(f"unknown score function {name!r}")
    return torch.round(values / EXCESS_QUANTUM) * EXCESS_QUANTUM


@dataclasses.dataclass
class Selection:
    """What to train on: None ratio = every unmasked token (plain causal LM). ``ratio`` is the final
    fraction kept; ``ratio_start`` (a schedule), ``select_after`` (a warm-up on every token) and
    ``steps`` (the run's length) set the fraction of each step (``set_step``)."""

    ratio: float | None = None
    scope: Scope = "sequence"
    score: str = "excess"
    ratio_start: float | None = None
    select_after: int = 0
    steps: int = 1
    #: batch scope: each score function's threshold carried from the previous global batch
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    _step_values: dict[str, list] = dataclasses.field(default_factory=dict)
    _current: float | None = None

    @property
    def selective(self) -> bool:
        return self.ratio is not None

    @property
    def current_ratio(self) -> float | None:
        """The fraction kept at the step being trained (``set_step``)."""
        if not self.selective:
            return None
        return self._current if self._current is not None else self.ratio_of(0)

    def ratio_of(self, step: int) -> float:
        return ratio_at(step, float(self.ratio), self.ratio_start, self.select_after, self.steps)

    def set_step(self, step: int) -> None:
        if self.selective:
            self._current = self.ratio_of(step)

    def kept(self, losses: torch.Tensor, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """kept [b, s] bool for one micro-batch (identical on every TP rank). ``inputs``: the
        micro-batch's ``ref_loss`` / ``ref_entropy`` / ``random`` [b, s] that the score reads."""
        candidate = mask > 0
        if not self.selective:
            return candidate
        names, op = parse_score(self.score)
        ratio = self.current_ratio
        values = {name: score_values(name, losses, inputs) for name in names}
        if self.scope == "batch":  # the next step's thresholds come from this step's values
            for name, v in values.items():
                self._step_values.setdefault(name, []).append(torch.where(candidate, v, torch.full_like(v, float("nan"))).reshape(-1))
        if ratio >= 1.0:  # warm-up or a ratio of 1: every token, whatever its score
            return candidate
        masks = [self._top(name, values[name], candidate, ratio) for name in names]
        if op is None:
            return masks[0]
        return masks[0] & masks[1] if op == "&" else masks[0] | masks[1]

    def _top(self, name: str, values: torch.Tensor, candidate: torch.Tensor, ratio: float) -> torch.Tensor:
        """The candidates among the top ``ratio`` of ``values`` in this selection's scope."""
        from cuda_ext import topk_mask

        if self.scope == "batch" and name in self.thresholds:
            return candidate & (values >= self.thresholds[name])
        # under context parallelism a rank holds two chunks of each sequence: the top-k is taken over
        # the whole sequences (gathered in order, so ties fall as without CP), each rank keeps its part
        cp = _cp()
        if cp is not None:
            values = whole_sequences(values, cp[0])
            candidate = whole_sequences(candidate.to(torch.uint8), cp[0]) > 0  # gloo gathers no bool
        if self.scope == "sequence":
            kept = topk_mask(values.reshape(-1), candidate.reshape(-1), float(ratio), values.shape[1])
            kept = kept.view_as(candidate)
        else:  # microbatch, and the batch scope's first step
            kept = _across_dp(values, candidate, ratio)
        return kept if cp is None else own_chunks(kept, cp[1], cp[2])

    def end_step(self, next_step: int) -> None:
        """Batch scope: the next step's thresholds from this step's values over all DP ranks, for the
        fraction the next step keeps."""
        step_values, self._step_values = self._step_values, {}
        if not (self.selective and self.scope == "batch"):
            return
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from cuda_ext import selection_k

        ratio = self.ratio_of(next_step)
        group = ps.get_data_parallel_group(with_context_parallel=True)  # every token of the batch
        world = dist.get_world_size(group)
        for name, parts_of_step in step_values.items():
            local = torch.cat(parts_of_step)
            if world > 1:
                parts = [torch.empty_like(local) for _ in range(world)]
                dist.all_gather(parts, local, group=group)
                local = torch.cat(parts)
            values = local[~torch.isnan(local)]
            if values.numel():
                # the k-th largest value, k as the selection rounds it: the next step keeps >= it
                k = selection_k(values.numel(), float(ratio))
                self.thresholds[name] = (
                    float("inf") if k == 0 else float(torch.kthvalue(values, values.numel() - k + 1).values.item())
                )


def _across_dp(values: torch.Tensor, candidate: torch.Tensor, ratio: float) -> torch.Tensor:
    """The top ``ratio`` of the micro-batch's candidates across the DP group (one all-gather)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from cuda_ext import topk_mask

    group = ps.get_data_parallel_group()
    world = dist.get_world_size(group)
    flat = torch.stack([values.reshape(-1), candidate.reshape(-1).float()])  # [2, b*s]
    if world > 1:
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat, group=group)
        flat_all = torch.cat(parts, dim=1)
    else:
        flat_all = flat
    kept_all = topk_mask(flat_all[0].contiguous(), flat_all[1] > 0, float(ratio), 0)
    n = values.numel()
    rank = dist.get_rank(group) if world > 1 else 0
    return kept_all[rank * n:(rank + 1) * n].view_as(candidate)


def _cp():
    """(group, size, rank) of this rank's context-parallel group, or None without CP."""
    from megatron.core import parallel_state as ps

    size = ps.get_context_parallel_world_size()
    # 0 before megatron's groups exist (unit tests of the selection alone)
    return None if size <= 1 else (ps.get_context_parallel_group(), size, ps.get_context_parallel_rank())


#: what a traced micro-batch records (``make_loss_func(trace=True)``), each [b, s] but ``samples`` [b]:
#: global sample numbers, the sample's tokens and labels, the loss mask, the training loss, what was
#: kept, and the selection's inputs (reference loss / entropy, random draws) where the run has them
TRACE_FIELDS = ("samples", "tokens", "labels", "loss_mask", "loss", "kept", "ref_loss", "ref_entropy", "random")

#: the micro-batch keys a selection may read (``Selection.kept``'s inputs)
SELECTION_INPUTS = ("ref_loss", "ref_entropy", "random")


def make_loss_func(selection: Selection, batch: dict[str, torch.Tensor], trace: bool = False):
    """megatron's loss_func for one micro-batch: (kept loss sum, kept count, report). ``batch``:
    its ``loss_mask`` and whichever of ``SELECTION_INPUTS`` the data carries. ``trace``: the report
    also holds the micro-batch's ``trace`` (``TRACE_FIELDS``: what was selected, from what)."""
    loss_mask = batch["loss_mask"]
    held = {key: batch[key] for key in SELECTION_INPUTS if key in batch}

    def loss_func(losses: torch.Tensor):
        device = losses.device
        mask = loss_mask.to(device)
        inputs = {key: value.to(device) for key, value in held.items()}
        ref = inputs.get("ref_loss")
        kept = selection.kept(losses, inputs, mask)
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
        if not trace:
            return kept_sum, n_kept, {"report": report}
        record = {"samples": batch["samples"], "tokens": batch["tokens"], "labels": batch["labels"], "loss_mask": mask,
                  "loss": detached, "kept": kept, **inputs}
        return kept_sum, n_kept, {"report": report, "trace": {k: v.detach().cpu() for k, v in record.items()}}

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
