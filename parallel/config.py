"""Plain frozen dataclasses for the engine: the model's shape and a training run's options.

``rhocli`` fills them from YAML + flags (``rhocli.core.config``); ``parallel`` only reads
them. Field docstrings are the documentation of the YAML keys (docs/train.md).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama / Mistral / Qwen2-style decoder (RMSNorm, SwiGLU, RoPE, GQA; biases on the query/key/value
    projections only with ``qkv_bias``; output layer tied to the embedding with ``tie_word_embeddings``)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA); equal to num_attention_heads for plain multi-head attention."""
    max_position_embeddings: int
    vocab_size: int | None = None
    """True vocabulary size; null takes it from the training data's tokenizer."""
    architecture: Literal["llama", "mistral", "qwen2"] = "llama"
    """Which Hugging Face architecture this shape exports to."""
    rope_theta: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this; the TP size must divide it
    (``parallel.layout.padded_vocab_size``)."""
    sliding_window: int | None = None
    """Mistral's attention window; recorded for export. Training sequences must not exceed it."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2); no other linear has one."""
    tie_word_embeddings: bool = False
    """The output layer is the input embedding (Llama-3.2-1B/3B, the small Qwen2.5s)."""
    rope_scaling_factor: float | None = None
    """Llama 3.x RoPE scaling (``rope_type: llama3``) with this factor; its other parameters are
    megatron-core's fixed ones (low/high frequency factors 1 and 4, original context 8192), as in
    every Llama 3.1/3.2 release."""

    #: the allowed range of each numeric option (``>= x``, ``> x``, ``[a, b)``), checked where a config
    #: is parsed (``rhocli.core.config``); None is always allowed where the type allows it
    RANGES: ClassVar[dict[str, str]] = {
        "num_layers": ">= 1", "hidden_size": ">= 1", "ffn_hidden_size": ">= 1", "num_attention_heads": ">= 1",
        "num_query_groups": ">= 1", "max_position_embeddings": ">= 1", "vocab_size": ">= 1", "rope_theta": "> 0",
        "norm_epsilon": "> 0", "init_method_std": "> 0", "make_vocab_size_divisible_by": ">= 1", "sliding_window": ">= 1",
        "rope_scaling_factor": "> 0",
    }


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One ``rho train`` run (the YAML ``train:`` section, overridden by flags)."""

    data: tuple[str, ...] = ()
    """Token dataset prefixes, each optionally PREFIX:WEIGHT (weights are normalised)."""
    save: str | None = None
    """Run directory: checkpoints, metrics.jsonl, the resolved config."""
    steps: int = 100
    seq_length: int = 128
    micro_batch_size: int = 2
    global_batch_size: int = 8
    """Sequences per optimizer step: micro_batch_size x micro-batches x data-parallel ranks."""
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    lr_decay_style: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """After warmup: cosine/linear decay to min_lr over the run, constant, or wsd (warmup-stable-decay:
    lr held until the last ``wsd_decay_steps``, then decayed to min_lr; megatron-core's WSD)."""
    wsd_decay_steps: int | None = None
    """wsd: steps of the final decay (null: a tenth of ``steps``, at least 1)."""
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """wsd: the shape of the final decay (megatron-core's lr_wsd_decay_style)."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recomputation (megatron-core's recompute_granularity): full recomputes whole
    transformer layers in backward (``recompute_method``, ``recompute_num_layers``); selective only
    the submodules ``recompute_modules`` (megatron-core's default: core attention)."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """full: uniform recomputes every layer in chunks of ``recompute_num_layers``; block the first
    ``recompute_num_layers`` layers of each pipeline stage."""
    recompute_num_layers: int = 1
    recompute_modules: tuple[str, ...] = ()
    """selective: megatron-core's recompute_modules (e.g. core_attn, mlp, layernorm); empty: its default."""
    sequence_parallel: bool = False
    """Sequence parallelism (megatron-core's ``sequence_parallel``, TP > 1): norms, dropout and the
    residual stream hold only this rank's 1/tp of the sequence, so activations outside attention and
    MLP shrink tp-fold; the TP all-reduces become reduce-scatter + all-gather (the same bytes).
    ``seq_length`` must be a multiple of ``tp``."""
    distributed_optimizer: bool | None = None
    """megatron-core's distributed optimizer (ZeRO-1): the fp32 main weights and optimizer state are
    sharded over the data-parallel ranks (gradients reduce-scattered, weights all-gathered). null: on
    for DP > 1 on GPU, off on CPU. Its checkpoints are saved in model space, so a run resumes into
    another DP size (or without it)."""
    overlap_grad_reduce: bool | None = None
    """Reduce gradients bucket by bucket while the backward pass goes on (megatron-core's DDP
    ``overlap_grad_reduce``). null: on with DP > 1 on GPU."""
    overlap_param_gather: bool | None = None
    """With the distributed optimizer: all-gather the updated weights during the next forward pass
    instead of after the step (``overlap_param_gather``). null: on when the distributed optimizer is
    and the gradient reduction overlaps."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    optimizer: Literal["adam", "sgd"] = "adam"
    clip_grad: float = 1.0
    seed: int = 1234
    split: str = "98,2,0"
    """train,valid,test weights for splitting documents (Megatron's --split)."""
    eval_interval: int = 50
    eval_iters: int = 5
    eval_data: tuple[str, ...] = ()
    """Validation token datasets (PREFIX or PREFIX:WEIGHT), e.g. held-out clean text (Megatron's
    --valid-data-path). Empty: validate on the ``split`` share of ``data``; set: ``data`` is used
    whole for training and ``split`` is ignored."""
    eval_masks: tuple[str, ...] = ()
    """Static token masks for the ``eval_data`` prefixes, in the same order (e.g. PREFIX.mask from
    rho tokenize --response-key): validation counts only their kept tokens, as training does with
    ``masks``. Empty: every token of ``eval_data``."""
    save_interval: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    checkpoint: bool = True
    """Write checkpoints at all (false only for benchmarks: nothing to resume from)."""
    async_save: bool = False
    """Write checkpoints in the background (megatron-core's asynchronous dist_checkpointing: the
    tensors are copied to host memory, a forked writer process writes them while training goes on);
    the checkpoint is published, and ``latest`` moves, only once every rank's writes are complete."""
    tensorboard: str | None = None
    """Also log the metrics.jsonl scalars as TensorBoard events in this directory (extra: tensorboard)."""
    wandb_project: str | None = None
    """Also log the metrics.jsonl scalars to this Weights & Biases project (extra: wandb; honours
    WANDB_MODE=offline and WANDB_DIR)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device at the training precision, for the MFU in metrics.jsonl
    (model TFLOP/s per device / this). Null: 989 (H100/H200 bf16) with CUDA, no MFU on CPU."""
    log_interval: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU. fp16 trains with a loss scale (below): for GPUs without bf16."""
    loss_scale: float | None = None
    """fp16: a fixed loss scale; null: dynamic (megatron-core's DynamicGradScaler: halved when the
    gradients overflow, and that step skipped; doubled after ``loss_scale_window`` clean steps)."""
    initial_loss_scale: float = 2.0**32
    loss_scale_window: int = 1000
    loss_scale_hysteresis: int = 2
    """fp16, dynamic: overflowing steps tolerated before the scale is halved."""
    tp: int = 1
    pp: int = 1
    dp: int | None = None
    """Data-parallel size; null: world size / (tp x pp x cp)."""
    cp: int = 1
    """Context-parallel size: each sequence split over ``cp`` ranks (megatron-core's context
    parallelism; attention exchanges keys and values between them). For sequences whose activations
    do not fit one device; Transformer Engine's attention on a GPU."""
    virtual_pp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B, Megatron-LM's
    --num-layers-per-virtual-pipeline-stage expressed as chunks): each rank holds ``virtual_pp``
    non-adjacent slices of the layers, which shrinks the pipeline bubble by that factor for more
    point-to-point traffic. Needs pp > 1, layers divisible by pp x virtual_pp and at least pp
    micro-batches per step."""
    init: str | None = None
    """Start from these weights: a rho checkpoint (a run dir or a step dir) or a Hugging Face model
    directory (config.json + safetensors, each rank reading its shards); new optimizer, step 0."""
    resume: bool = False
    """Continue the run in ``save`` exactly from its latest checkpoint."""
    stop_after: int | None = None
    """End this invocation after this step, with a checkpoint; the LR schedule still spans ``steps``
    (Megatron's --exit-interval). Continue with --resume."""
    scores: tuple[str, ...] = ()
    """Score stores (rho score) for the --data prefixes, in the same order: enables selective training."""
    select_ratio: float | None = None
    """Fraction of tokens to train on, by excess loss (Rho-1: 0.6 for 1B, 0.7 for 7B); needs scores."""
    select_scope: Literal["sequence", "microbatch", "batch"] = "sequence"
    """Where the top k% is taken: each sequence (default), the micro-batch across DP, or a threshold
    from the previous global batch (docs/selective.md)."""
    select_by: str = "excess"
    """What tokens are ranked by: excess (Rho-1), reference, training, entropy, random, or two joined by
    & (kept by both) or | (kept by either), e.g. reference&entropy (docs/selective.md)."""
    select_ratio_start: float | None = None
    """A schedule: the fraction kept moves linearly from this to select_ratio over the selective steps."""
    select_after: int = 0
    """A warm-up: train on every token for this many steps before selecting."""
    reference: str | None = None
    """The reference model run online (instead of ``scores``): a rho checkpoint (run or step directory)
    or a Hugging Face Llama/Mistral/Qwen2 directory with the run's vocabulary. Each step it scores the
    micro-batches the step trains on, on the run's own layout, so the excess compares the two models
    on the same context (docs/selective.md)."""
    trace_selection: int = 0
    """Record, for the first N steps, every trained sample's tokens, losses and kept tokens in
    RUN/selection_trace/ (``rho analyze context`` reads them)."""
    masks: tuple[str, ...] = ()
    """Static token masks (rho select) for the --data prefixes, in the same order: only tokens with
    mask 1 are trained on (and counted)."""
    separate_documents: bool = False
    """Documents packed into one sequence do not attend to each other (megatron's
    reset_attention_mask and reset_position_ids: every EOD cuts the attention): SFT on packed
    examples. The local layer spec's attention (CPU, and GPUs without Transformer Engine)."""
    pack: Literal["stream", "whole"] = "stream"
    """How documents fill the samples: stream (megatron's GPTDataset: one stream of documents cut into
    samples, so an example may start in one sample and end in the next) or whole (each sample holds
    whole documents, padded at its end; for SFT: no response trained without its prompt)."""
    epochs: float | None = None
    """Train for this many passes over the --data tokens: sets ``steps`` to
    ceil(epochs x tokens / (seq_length x global_batch_size)). null: ``steps`` as given."""
    data_cache: str | None = None
    """Where GPTDataset caches its sample indices (default: SAVE/data_cache)."""

    #: the allowed range of each numeric option (see ModelConfig.RANGES)
    RANGES: ClassVar[dict[str, str]] = {
        "steps": ">= 1", "seq_length": ">= 1", "micro_batch_size": ">= 1", "global_batch_size": ">= 1",
        "lr": ">= 0", "min_lr": ">= 0", "warmup_steps": ">= 0", "wsd_decay_steps": ">= 1", "recompute_num_layers": ">= 1", "weight_decay": ">= 0", "adam_beta1": "[0, 1)",
        "adam_beta2": "[0, 1)", "adam_eps": "> 0", "clip_grad": ">= 0", "seed": ">= 0", "eval_interval": ">= 0",
        "eval_iters": ">= 0", "save_interval": ">= 0", "log_interval": ">= 1", "tp": ">= 1", "pp": ">= 1", "dp": ">= 1", "cp": ">= 1", "virtual_pp": ">= 1",
        "loss_scale": "> 0", "initial_loss_scale": "> 0", "loss_scale_window": ">= 1", "loss_scale_hysteresis": ">= 1",
        "stop_after": ">= 1", "select_ratio": "(0, 1]", "select_ratio_start": "(0, 1]", "select_after": ">= 0", "peak_tflops": "> 0",
        "trace_selection": ">= 0",
    }
