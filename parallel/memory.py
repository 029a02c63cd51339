"""How much device memory a training layout needs on its most loaded rank: an estimate, before any
process starts (``rho train --dry-run``), so a 7B run can be sized before GPUs are requested.

Four parts, each counted the way rho builds the run (``parallel/trainer.py``, ``parallel/model.py``):

* **weights**: this rank's parameters (its pipeline stage's layers, 1/tp of every linear layer and of
  the padded vocabulary, the norms whole; the embedding on the first stage, the final norm and the
  output layer on the last) in the parameter dtype.
* **gradients**: megatron-core's DDP keeps every parameter's gradient in one contiguous ``main_grad``
  buffer; rho builds it with ``grad_reduce_in_fp32=True``, so 4 bytes per parameter in any precision.
* **optimizer state**: Adam's two moments in fp32 (8 bytes per parameter), plus, in bf16/fp16, the
  fp32 main copy of the weights (4 more; megatron's mixed-precision optimizers keep it). SGD (momentum
  0, as rho configures it) keeps only that main copy. The distributed optimizer shards all of it over
  the data-parallel ranks.
* **activations**: what autograd saves between a micro-batch's forward and its backward, times the
  micro-batches in flight on the rank under 1F1B, plus what a recomputing backward holds at once.

The activation count follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): per layer and micro-batch, the paper's GPT layer saves s·b·h·(34 + 5·a·s/h) bytes
in 16-bit (the 5·a·s/h term is the attention's [b, a, s, s] scores, softmax and dropout mask), TP
divides what lies between the column- and row-parallel linears, sequence parallelism the rest, and
full recomputation keeps only each checkpointed layer's input. rho's layer is not the paper's GPT
layer, so the constants are rho's own, read off its tensors (see ``layer_bytes``) and checked
against a forward pass on CPU by ``tests/test_memory.py``:

* attention is PyTorch's fused SDPA (``parallel/attention.py``): it saves q, k, v, its output and an
  fp32 logsumexp per head and token, never the [s, s] scores, so there is no 5·a·s/h term, and
  selective recomputation of ``core_attn`` frees only that logsumexp;
* SwiGLU (two ffn-wide halves), grouped-query K/V (g/a of a head set), RoPE (a rotated q and k),
  RMSNorm, no biases and no dropout (so no dropout masks).

Left out: the CUDA context and kernels' workspaces, NCCL buffers, the allocator's fragmentation and
cached blocks, transient tensors (gradients of activations during backward, the optimizer step's
temporaries), DDP's bucket padding. Expect the real peak 10-20 % above the estimate.
"""

from __future__ import annotations

import dataclasses
import math

from parallel.config import ModelConfig, TrainConfig
from parallel.layout import micro_batches_per_step, padded_vocab_size

#: bytes per element of a parameter / activation dtype
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
INT64 = 8
#: megatron-core's selective-recompute modules whose effect on a dense GPT layer rho counts; the
#: others either do not apply to it (moe, moe_act, shared_experts, mla_up_proj) or do not run
#: without Transformer Engine in megatron-core 0.16 (layernorm), and are counted as freeing nothing
SELECTIVE_DEFAULT = ("core_attn",)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded rank of a layout (``pipeline_rank``; TP and DP ranks are alike)."""

    pipeline_rank: int
    parameters: int
    """Parameters held by that rank (all its virtual pipeline stages)."""
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    """As configured (``recompute``): the saved activations of the micro-batches in flight, plus the
    layers a full-recompute backward re-runs at once."""
    activations_no_recompute: int
    activations_full_recompute: int
    """With ``recompute: full``, uniform, one layer per checkpoint (Megatron-LM's usual setting)."""
    micro_batches_in_flight: int
    """Micro-batches (under interleaving: micro-batch x model-chunk pairs) whose activations the rank
    holds at its peak."""
    precision: str
    optimizer: str
    distributed_optimizer: bool
    recompute: str
    reference_parameters: int = 0
    """The online reference model's parameters on that rank (``rho train --reference``; 0 without)."""
    reference: int = 0
    """Its weights in the training precision, plus what its forward holds at once: one micro-batch's
    hidden states in and out of a layer and a block of output-layer logits (``OutputStats``)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.reference


@dataclasses.dataclass(frozen=True)
class MicroBatchActivations:
    """Bytes one micro-batch leaves on one model chunk between its forward and its backward."""

    layers: int
    """Saved by the chunk's transformer layers (under the configured recompute)."""
    embedding: int
    """First chunk: the token ids the embedding lookup saves (and, under TP, its vocabulary mask)."""
    head: int
    """Last chunk: the final norm, the output layer's input, the logits [s, b, vocab/tp] (rho's fused
    loss keeps them and writes their gradient in place) and the loss's token ids and logsumexp."""
    stage_output: int
    """Not the last chunk: the output the 1F1B schedule keeps until the backward
    (megatron-core's ``deallocate_pipeline_outputs`` is off)."""
    recompute_working: int
    """Full recompute: the activations of the layers one checkpoint re-runs in backward (transient:
    one micro-batch at a time)."""

    @property
    def saved(self) -> int:
        """What autograd holds for this micro-batch on this chunk (what a forward under
        ``saved_tensors_hooks`` sees)."""
        return self.layers + self.embedding + self.head


@dataclasses.dataclass(frozen=True)
class _Dims:
    """One rank's view of a micro-batch: sizes, the TP split, element sizes."""

    seq: int
    batch: int
    hidden: int
    ffn: int
    heads: int
    kv: int
    """Width of the key (and of the value) projection: query groups x head size."""
    head_dim: int
    padded_vocab: int
    tp: int
    sequence_parallel: bool
    elem: int
    """Bytes per activation element (the parameter dtype)."""
    fused_norm: bool
    """CUDA: torch's fused RMSNorm kernel (saves its input and an fp32 rstd); CPU: the composite
    (saves its input as fp32 and the fp32 normalised input)."""

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def residual_tokens(self) -> int:
        """Tokens of the residual stream this rank holds: [s/tp, b, h] under sequence parallelism."""
        return self.tokens // self.tp if self.sequence_parallel else self.tokens


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """``auto`` is bf16 on a GPU and fp32 on the CPU (as the trainer resolves it)."""
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


def _uses_distributed_optimizer(train: TrainConfig, dp: int, on_gpu: bool) -> bool:
    from parallel.trainer import data_parallel_features  # the trainer's own default, one home

    return bool(data_parallel_features(train, dp, on_gpu)["use_distributed_optimizer"])


# ------------------------------------------------------------------------------------------ parameters


def layer_parameters(model: ModelConfig, tp: int) -> int:
    """One transformer layer's parameters on one TP rank: the linears split tp-fold, the two norms
    whole."""
    h, head_dim = model.hidden_size, model.hidden_size // model.num_attention_heads
    qkv = (h + model.qkv_bias) * (model.num_attention_heads + 2 * model.num_query_groups) * head_dim  # [(a + 2g)·d, h (+1)]
    proj = model.num_attention_heads * head_dim * h  # [h, a·d]
    mlp = 3 * h * model.ffn_hidden_size  # fc1 [2f, h] (gate and up), fc2 [h, f]
    return (qkv + proj + mlp) // tp + 2 * h


def rank_parameters(model: ModelConfig, vocab_size: int, tp: int, pp: int, vpp: int, pipeline_rank: int) -> int:
    """Parameters on one rank of pipeline stage ``pipeline_rank``: its ``vpp`` model chunks of
    num_layers / (pp·vpp) layers each; model chunk 0 (rank 0) holds the embedding, the last chunk
    (rank pp - 1) the final norm and the output layer (untied), each 1/tp of the padded vocabulary."""
    vocab = padded_vocab_size(vocab_size, tp, model.make_vocab_size_divisible_by)
    layers = model.num_layers // pp  # over all of this rank's chunks
    count = layers * layer_parameters(model, tp)
    if pipeline_rank == 0:
        count += vocab // tp * model.hidden_size  # embedding [vocab/tp, h]
    if pipeline_rank == pp - 1:
        count += model.hidden_size  # final norm [h]
        if not (model.tie_word_embeddings and pp == 1):  # tied: the last stage keeps a copy when pp > 1
            count += vocab // tp * model.hidden_size  # output [vocab/tp, h]
    return count


# ------------------------------------------------------------------------------------------ activations


def _norm_bytes_per_token(d: _Dims) -> int:
    """What one RMSNorm saves per token of the residual stream."""
    if d.fused_norm:  # input [.., h] in the activation dtype + rstd [.., 1] fp32
        return d.hidden * d.elem + FP32
    # composite: pow saves the fp32 input (the input itself in fp32, an upcast copy otherwise),
    # the multiply by the weight saves the fp32 x·rstd, plus rstd
    return 2 * d.hidden * FP32 + FP32


def layer_bytes(d: _Dims, selective: frozenset[str] = frozenset()) -> int:
    """One transformer layer, one micro-batch, no full recompute: the bytes autograd saves.

    Residual side ([s, b, h], or [s/tp, b, h] under sequence parallelism): per norm its saved
    tensors and its output, which the column-parallel linear after it saves (with SP: the local
    slice, re-gathered in backward). TP side (split tp-fold): the QKV output [s, b, (a + 2g)·d]
    (v is a view of it), the rotated q [s, b, a·d] and k [s, b, g·d], SDPA's output [s, b, a·d] (the
    row-parallel projection saves the same storage as its input) and its fp32 logsumexp [b, a, s];
    the MLP's fc1 output [s, b, 2f] (SiLU saves its gate half, a view), megatron's ``x_linear +
    glu_linear_offset`` [s, b, f], SiLU's output [s, b, f] and fc2's input [s, b, f]. Per sequence
    position: RoPE's cos and sin [s, 1, 1, d] for q and for k.
    """
    n, n_res, t, e = d.tokens, d.residual_tokens, d.tp, d.elem
    residual = 2 * n_res * (_norm_bytes_per_token(d) + d.hidden * e)
    qkv_out = n * (d.hidden + 2 * d.kv) // t * e
    rotated = n * (d.hidden + d.kv) // t * e
    sdpa_out = n * d.hidden // t * e
    # recomputing core attention frees only SDPA's logsumexp (its checkpoint keeps q, k, v, and an
    # int32 mask type); the output is saved by the projection anyway
    logsumexp = 4 if "core_attn" in selective else n * d.heads // t * FP32
    rope = 4 * d.seq * d.head_dim * e
    mlp = 0 if "mlp" in selective else 5 * n * d.ffn // t * e  # recomputed from its (kept) input
    return residual + qkv_out + rotated + sdpa_out + logsumexp + rope + mlp


def _chunk_layers(d: _Dims, layers: int, train: TrainConfig, recompute: str) -> tuple[int, int]:
    """(saved, recompute working set) of ``layers`` layers of one chunk for one micro-batch."""
    if recompute == "selective":
        return layers * layer_bytes(d, frozenset(train.recompute_modules or SELECTIVE_DEFAULT)), 0
    full = layer_bytes(d)
    if recompute != "full":
        return layers * full, 0
    checkpoint_input = d.residual_tokens * d.hidden * d.elem  # [s(/tp), b, h] per checkpoint
    rotary = d.seq * d.head_dim * FP32  # the checkpoint also saves RoPE's fp32 freqs [s, 1, 1, d]
    n = min(train.recompute_num_layers, layers)
    if train.recompute_method == "block":  # the first n layers checkpointed one by one, the rest kept
        return n * checkpoint_input + (layers - n) * full + (rotary if n else 0), full if n else 0
    # uniform: checkpoints of n layers each, one re-run at a time in backward
    return math.ceil(layers / n) * checkpoint_input + rotary, n * full


def microbatch_activations(d: _Dims, layers: int, first: bool, last: bool, train: TrainConfig,
                           recompute: str) -> MicroBatchActivations:
    """One micro-batch on one model chunk of ``layers`` layers."""
    saved, working = _chunk_layers(d, layers, train, recompute)
    residual = d.residual_tokens * d.hidden * d.elem
    head = 0
    if last:
        logits = d.tokens * d.padded_vocab // d.tp * d.elem  # [s, b, vocab/tp]
        head = (d.residual_tokens * _norm_bytes_per_token(d) + residual + logits
                + d.tokens * (INT64 + FP32))  # the loss's target ids and logsumexp
    # the lookup's token ids [b, s] int64; under TP also the bool mask of the ids outside this
    # rank's slice of the vocabulary (their rows are zeroed in place)
    embedding = d.tokens * (INT64 + (1 if d.tp > 1 else 0)) if first else 0
    return MicroBatchActivations(layers=saved, embedding=embedding, head=head,
                                 stage_output=0 if last else residual, recompute_working=working)


def micro_batches_in_flight(pp: int, vpp: int, num_microbatches: int, pipeline_rank: int) -> int:
    """Micro-batches (x model chunks, interleaved) whose forward is done and backward is not, at the
    rank's peak: megatron-core's warm-up count + 1 (``get_pp_rank_microbatches``). 1F1B: pp - rank;
    interleaved: 2·(pp - rank - 1) + (vpp - 1)·pp + 1 chunks of num_layers/(pp·vpp) layers, i.e. on
    rank 0 the layers of pp·(1 + (pp - 1)/(pp·vpp)) stages' worth, Korthikanti et al.'s count.
    Without a pipeline each micro-batch's backward runs before the next forward: 1."""
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp - pipeline_rank, num_microbatches)
    warmup = 2 * (pp - pipeline_rank - 1) + (vpp - 1) * pp
    return min(warmup + 1, num_microbatches * vpp)


def micro_batch_dims(model: ModelConfig, train: TrainConfig, vocab_size: int, on_gpu: bool = True) -> _Dims:
    """The sizes one rank sees of a micro-batch of ``train`` (its TP, SP, CP, precision): under
    context parallelism a rank holds seq_length / cp tokens of each sequence."""
    precision = resolve_precision(train.precision, on_gpu)
    head_dim = model.hidden_size // model.num_attention_heads
    return _Dims(seq=train.seq_length // train.cp, batch=train.micro_batch_size, hidden=model.hidden_size,
                 ffn=model.ffn_hidden_size, heads=model.num_attention_heads, kv=model.num_query_groups * head_dim,
                 head_dim=head_dim, padded_vocab=padded_vocab_size(vocab_size, train.tp, model.make_vocab_size_divisible_by),
                 tp=train.tp, sequence_parallel=train.sequence_parallel, elem=DTYPE_BYTES[precision], fused_norm=on_gpu)


def rank_activations(model: ModelConfig, train: TrainConfig, vocab_size: int, num_microbatches: int,
                     pipeline_rank: int, recompute: str, on_gpu: bool = True) -> tuple[int, int]:
    """(activation bytes at the peak, micro-batches in flight) on one pipeline rank.

    The in-flight micro-batches each hold their saved layers (and first stage: token ids; not last:
    the kept stage output); the last stage's head (logits) and a full recompute's working set are
    one micro-batch's and never coexist (the loss's backward frees the logits before any layer is
    re-run), so the larger of the two is added once. Interleaved: every in-flight chunk is counted
    as keeping its output and, on rank 0, its token ids (true of some chunks only: a slight
    over-count)."""
    pp, vpp = train.pp, train.virtual_pp or 1
    d = micro_batch_dims(model, train, vocab_size, on_gpu)
    in_flight = micro_batches_in_flight(pp, vpp, num_microbatches, pipeline_rank)
    chunk = microbatch_activations(d, model.num_layers // (pp * vpp), first=pipeline_rank == 0,
                                   last=pipeline_rank == pp - 1, train=train, recompute=recompute)
    kept = chunk.stage_output if vpp == 1 else d.residual_tokens * d.hidden * d.elem
    held = in_flight * (chunk.layers + chunk.embedding + kept)
    return held + max(chunk.head, chunk.recompute_working), in_flight


# ------------------------------------------------------------------------------------------ the estimate


def _optimizer_bytes_per_param(optimizer: str, precision: str) -> int:
    main_copy = 0 if precision == "fp32" else FP32  # the fp32 main weights of mixed precision
    moments = 2 * FP32 if optimizer == "adam" else 0  # exp_avg, exp_avg_sq; SGD with momentum 0: none
    return main_copy + moments


def reference_bytes(reference: ModelConfig, train: TrainConfig, vocab_size: int, pipeline_rank: int,
                    precision: str) -> tuple[int, int]:
    """(parameters, bytes) of the online reference model on ``pipeline_rank``: its weights (no
    gradient, no optimizer state) and its forward's working set, which is freed before the training
    forward starts (forward only: nothing is saved for a backward)."""
    from parallel.output_stats import GPU_LOGITS_ELEMENTS

    params = rank_parameters(reference, vocab_size, train.tp, train.pp, train.virtual_pp or 1, pipeline_rank)
    width = DTYPE_BYTES[precision]
    tokens = train.micro_batch_size * train.seq_length // train.cp
    hidden = 2 * tokens * reference.hidden_size * width  # a layer's input and output
    ffn = 2 * tokens * reference.ffn_hidden_size // train.tp * width  # SwiGLU's two halves
    logits = 0
    if pipeline_rank == train.pp - 1:
        vocab_local = padded_vocab_size(vocab_size, train.tp, reference.make_vocab_size_divisible_by) // train.tp
        logits = min(tokens * vocab_local, GPU_LOGITS_ELEMENTS) * (width + FP32)
    return params, params * width + hidden + ffn + logits


def estimate_memory(model: ModelConfig, train: TrainConfig, vocab_size: int, dp: int,
                    on_gpu: bool = True, reference: ModelConfig | None = None) -> MemoryEstimate:
    """The per-rank memory of ``train``'s layout (tp, pp, virtual_pp from ``train``, ``dp`` data-parallel
    ranks) on its most loaded pipeline rank. ``on_gpu``: size the run for CUDA devices (``precision:
    auto`` is bf16, the distributed optimizer's default is on for dp > 1, RMSNorm is fused) rather
    than for this CPU. Raises LayoutError when the batch does not split into micro-batches."""
    precision = resolve_precision(train.precision, on_gpu)
    num_microbatches = micro_batches_per_step(train.global_batch_size, train.micro_batch_size, dp)
    # gradients are reduced, and the distributed optimizer's state sharded, over the DP x CP ranks
    shards = dp * train.cp
    distributed = _uses_distributed_optimizer(train, shards, on_gpu)
    per_param_state = _optimizer_bytes_per_param(train.optimizer, precision)
    vpp = train.virtual_pp or 1
    candidates = []
    for rank in range(train.pp):
        params = rank_parameters(model, vocab_size, train.tp, train.pp, vpp, rank)
        state = params * per_param_state
        configured, in_flight = rank_activations(model, train, vocab_size, num_microbatches, rank, train.recompute, on_gpu)
        without, _ = rank_activations(model, train, vocab_size, num_microbatches, rank, "none", on_gpu)
        full_uniform = dataclasses.replace(train, recompute_method="uniform", recompute_num_layers=1)
        full, _ = rank_activations(model, full_uniform, vocab_size, num_microbatches, rank, "full", on_gpu)
        ref_params, ref_bytes = (reference_bytes(reference, train, vocab_size, rank, precision) if reference is not None
                                 else (0, 0))
        candidates.append(MemoryEstimate(
            pipeline_rank=rank, parameters=params, weights=params * DTYPE_BYTES[precision],
            gradients=params * FP32,  # DDP's main_grad buffer: grad_reduce_in_fp32 (parallel/trainer.py)
            optimizer_state=math.ceil(state / shards) if distributed else state,
            activations=configured, activations_no_recompute=without, activations_full_recompute=full,
            micro_batches_in_flight=in_flight, precision=precision, optimizer=train.optimizer,
            distributed_optimizer=distributed, recompute=train.recompute, reference_parameters=ref_params,
            reference=ref_bytes))
    return max(candidates, key=lambda e: (e.total, -e.pipeline_rank))
