"""The reference model of selective training, run on the very samples the trained model reads.

Rho-1 ranks a token by ``L_train(x_i) - L_ref(x_i)``: both losses of the same token predicted from the
same context. ``ReferenceModel`` is a frozen GPTModel built on the run's own TP / PP / CP (and
virtual-pipeline) layout, its size free (its own layers and heads; the vocabulary is the run's), in
the training precision, without gradients or optimizer state. ``losses(batches)`` runs megatron's
forward-only schedule over a step's micro-batches (the same dicts the training schedule then reads:
tokens, position ids, packed documents' attention mask) and returns, on the last pipeline stage, each
micro-batch's per-token reference loss (and entropy), reduced from the output layer by
``OutputStats`` (no ``[tokens, vocab]`` tensor kept). Under context parallelism the values are this
rank's chunks of each sequence, as the training loss sees them.

Used online by the trainer (``rho train --reference``: each step scores the micro-batches it trains
on, before its forward-backward) and offline by ``score_samples`` (``rho score --for-run``: a sample
score store of a run's own samples, which ``rho train --scores`` reads back through
``MicroBatches``): both read the same batches through the same code, so at the same layout and
micro-batch size they give the same numbers bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from parallel.config import ModelConfig
from parallel.context_parallel import split_for_context_parallel
from parallel.model import build_model_chunks, model_shape


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    """The reference model a run selects with: its shape and where its weights are."""

    model: ModelConfig
    #: "rho" (a checkpoint's step directory) or "huggingface" (a model directory)
    format: str
    path: str
    #: content fingerprint of its weights (recorded in the run's checkpoints; a resume must match)
    fingerprint: str


#: load(chunks, shape): fill the freshly built chunks with the reference's weights (the caller's:
#: ``load_reference_weights`` with the right tensor reader)
ReferenceLoader = Callable[[list, Any], None]


def load_reference_weights(chunks: list, shape, spec: ReferenceSpec, tp: int, tensors=None) -> None:
    """A rho checkpoint through dist_checkpointing (any layout it was saved at), or this rank's slices
    of a Hugging Face model's tensors (``tensors(name)``: the caller's reader)."""
    from pathlib import Path

    if spec.format == "huggingface":
        from megatron.core import parallel_state as ps

        from parallel.hf import load_hf_into_model

        for chunk in chunks:
            load_hf_into_model(chunk, tensors, spec.model, shape.padded_vocab_size, shape.params_dtype, tp,
                               ps.get_tensor_model_parallel_rank(), source=spec.path)
        return
    from parallel.checkpoint import load_checkpoint

    load_checkpoint(Path(spec.path), chunks)


def reference_features(features: dict) -> dict:
    """The trained model's TransformerConfig features that shape the layout (sequence, context and
    virtual-pipeline parallelism), without the training-only ones (activation recomputation)."""
    keep = ("sequence_parallel", "context_parallel_size", "virtual_pipeline_model_parallel_size")
    return {k: v for k, v in features.items() if k in keep}


class ReferenceModel:
    """This rank's part of the frozen reference model. ``features``: ``reference_features`` of the
    run's; ``entropy``: also the entropy of its next-token distribution (``--select-by entropy``)."""

    def __init__(self, spec: ReferenceSpec, vocab_size: int, tp: int, pp: int, vp: int, features: dict,
                 params_dtype: torch.dtype, load: ReferenceLoader, backend=None, entropy: bool = False):
        from megatron.core import parallel_state as ps

        from parallel.output_stats import OutputStats

        self.spec = spec
        self.shape = model_shape(spec.model, vocab_size, tp, params_dtype)
        self.entropy = entropy
        self.chunks = build_model_chunks(spec.model, self.shape, tp, pp, vp, features, weights_loaded=True,
                                         backend=backend)
        if torch.cuda.is_available():
            for chunk in self.chunks:
                chunk.cuda(torch.cuda.current_device())
        load(self.chunks, self.shape)
        for chunk in self.chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        # the chunk that ends the model returns its final hidden states; OutputStats reduces them
        last = self.chunks[-1]
        if ps.is_pipeline_last_stage():
            last.rho_output_stats = OutputStats(last, vocab_size, tp, bool(features.get("sequence_parallel")), entropy)

    @torch.no_grad()
    def losses(self, batches: list[dict[str, torch.Tensor]], seq_length: int, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Per micro-batch of ``batches`` (last pipeline stage; [] elsewhere): ``ref_loss`` [b, s_local]
        fp32 (and ``ref_entropy``), for this CP rank's chunks of each sequence."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            batch = split_for_context_parallel(next(data_iterator))
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            mask = batch.get("attention_mask")  # [b, 1, s, s] True = hidden (packed documents kept apart)
            hidden = model(batch["tokens"].to(device, non_blocking=True), batch["position_ids"].to(device, non_blocking=True),
                           attention_mask=None if mask is None else mask.to(device, non_blocking=True))
            stats = getattr(model, "rho_output_stats", None)
            if stats is None:  # an earlier stage: hidden states go to the next one
                return hidden, _no_loss
            labels = batch["labels"].to(device, non_blocking=True)  # [b, s_local]
            b, s = labels.shape
            # hidden [s, b, h]: row p*b + r is position p of sequence r
            values = stats(hidden, None, labels.transpose(0, 1).reshape(-1)).view(s, b, -1).transpose(0, 1)

            def loss_func(out: torch.Tensor):
                return out[..., 0].sum(), torch.tensor(1, dtype=torch.int), {"values": out.float()}

            return values, loss_func

        vp = len(self.chunks)
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches) if vp == 1 else [iter(batches) for _ in range(vp)],
            model=self.chunks, num_microbatches=len(batches), seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True,
        )
        result = []
        for out in outputs or []:
            values = out["values"]  # [b, s_local, 1 or 2]
            item = {"ref_loss": values[..., 0].contiguous()}
            if self.entropy:
                item["ref_entropy"] = values[..., 1].contiguous()
            result.append(item)
        return result


def _no_loss(output):  # never called: megatron calls a loss function on the last stage only
    raise AssertionError("loss function called on a stage that is not the last")


def score_samples(reference: ReferenceModel, micro_batches, first_step: int, steps: int, micro_batches_per_step: int,
                  seq_length: int, micro_batch_size: int, write: Callable[[int, list[int], dict[str, Any]], None] | None,
                  on_step: Callable[[int], None] | None = None) -> None:
    """The reference losses of a run's own training samples, step by step, as the run reads them.

    ``micro_batches``: this DP rank's ``parallel.data.MicroBatches`` over the run's training dataset
    (at ``first_step``); each step's micro-batches are scored together (one forward-only schedule
    call, as online), then ``write(step, samples, {"ref_loss": [b, s] numpy, ...})`` is called per
    micro-batch on the rank that holds the values (``write`` None elsewhere) and ``on_step(step)``
    once the step is done on this rank."""
    for step in range(first_step, steps):
        batches = [next(micro_batches) for _ in range(micro_batches_per_step)]
        values = reference.losses(batches, seq_length, micro_batch_size)
        if write is not None:
            for batch, item in zip(batches, values):
                write(step, batch["samples"].tolist(), {k: v.cpu().numpy() for k, v in item.items()})
        if on_step is not None:
            on_step(step)
