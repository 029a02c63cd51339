"""Build the Llama/Mistral flavour of megatron-core's ``GPTModel`` for this rank's pipeline stage.

RMSNorm, SwiGLU (gated linear unit with SiLU), RoPE with the configured theta, grouped-query
attention, untied input/output embeddings, no biases. Parallelism is applied by megatron-core's layers
from ``parallel_state`` (tensor-parallel linears, vocab-parallel embedding and output, the pipeline
stage's slice of layers).

Where the layers come from (``layer_backend``): on the CPU, megatron-core's local spec with rho's SDPA
attention and sequence-parallel RMSNorm, weights initialised on the CPU (``use_cpu_initialization``
makes the full initial weights the same for any TP size, so layouts can be compared). On a GPU, the
same spec with Transformer Engine's modules when ``transformer_engine`` imports (fused RMSNorm, its
linears, FlashAttention/cuDNN attention, fused RoPE), megatron's fused SwiGLU, and weights created
on the device; the parameter names are the local spec's either way, so a checkpoint loads under
both. Weights a checkpoint will overwrite are not initialised (``backend_features``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from parallel.config import ModelConfig
from parallel.errors import ModelConfigError
from parallel.layout import check_model_fits, padded_vocab_size


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What a built model needs beyond its config: the true and padded vocab, and precision."""

    vocab_size: int
    padded_vocab_size: int
    params_dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class LayerBackend:
    """Which implementation builds the layers (for the banner and the config)."""

    layer_spec: str
    """"local" (megatron-core's local spec + rho's SDPA/RMSNorm) or "transformer_engine"."""
    attention: str
    """"sdpa" (PyTorch's fused attention) or "te" (Transformer Engine: FlashAttention / cuDNN)."""
    on_gpu: bool
    """weights created on the device, fused SwiGLU (and RoPE with Transformer Engine)."""


def layer_backend(on_gpu: bool | None = None, te_available: bool | None = None, local: bool = False) -> LayerBackend:
    """The backend for this process: Transformer Engine's modules on a GPU where it imports, else
    the local spec. The CPU path is always the local one; ``local`` asks for it on a GPU too (packed
    documents kept apart: rho's SDPA takes megatron's explicit mask, TE's attention would not)."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if on_gpu and not local and (_te_importable() if te_available is None else te_available):
        return LayerBackend("transformer_engine", "te", True)
    return LayerBackend("local", "sdpa", on_gpu)


@functools.lru_cache(maxsize=None)
def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
    except Exception:  # absent, or built for another torch/CUDA: the local spec runs anyway
        return False
    return True


def backend_features(backend: LayerBackend, weights_loaded: bool = False) -> dict:
    """TransformerConfig fields for where the model runs. ``weights_loaded``: every weight is about
    to be overwritten by a checkpoint, so none is initialised."""
    features = {"use_cpu_initialization": not backend.on_gpu}
    if backend.on_gpu:
        # megatron's fused SwiGLU (bias_swiglu_impl; rho's linears have no bias)
        features["bias_activation_fusion"] = True
        # fused RoPE is Transformer Engine's kernel
        features["apply_rope_fusion"] = backend.layer_spec == "transformer_engine"
    if weights_loaded:
        # not perform_initialization=False: megatron-core (0.16-0.19) sets the tensor-parallel
        # attributes of a weight (which rank's shard it is; the gradient norm counts a weight without
        # them once, from TP rank 0) in the initialisation it skips; the TP2 gradient norm came out
        # 0.71 where TP1's is 1.26. An init method that leaves the memory as it is keeps them.
        features.update(init_method=_leave_uninitialised, output_layer_init_method=_leave_uninitialised,
                        embedding_init_method=_leave_uninitialised)
    return features


def _leave_uninitialised(weight: torch.Tensor) -> None:
    """megatron's init_method for weights a checkpoint is about to overwrite: none of the random
    number generation (minutes for a 7B model on a CPU)."""


def model_features(train_cfg) -> dict:
    """TransformerConfig fields for a TrainConfig's memory features: activation recomputation and
    sequence parallelism (none: {})."""
    features: dict = {}
    if train_cfg.recompute == "full":
        features.update(recompute_granularity="full", recompute_method=train_cfg.recompute_method,
                        recompute_num_layers=train_cfg.recompute_num_layers)
    elif train_cfg.recompute == "selective":
        modules = list(train_cfg.recompute_modules)
        features.update(recompute_granularity="selective", **({"recompute_modules": modules} if modules else {}))
    if train_cfg.sequence_parallel:
        features["sequence_parallel"] = True
    if (train_cfg.virtual_pp or 1) > 1:
        features["virtual_pipeline_model_parallel_size"] = train_cfg.virtual_pp
    if getattr(train_cfg, "cp", 1) > 1:
        features["context_parallel_size"] = train_cfg.cp
    return features


def context_parallel_problem(backend: LayerBackend | None = None) -> str | None:
    """Why this process cannot split sequences over ranks, or None. On a GPU that is Transformer
    Engine's attention (ring exchange of keys and values, overlapped); on the CPU rho's own
    (``parallel.attention.context_parallel_sdpa``: the keys and values gathered)."""
    backend = backend or layer_backend()
    if backend.on_gpu and backend.attention != "te":
        return "context parallelism on a GPU needs Transformer Engine's attention (transformer_engine does not import here)"
    return None


def transformer_config(cfg: ModelConfig, tp: int, pp: int, params_dtype: torch.dtype, **features):
    """megatron-core's TransformerConfig for this model and layout, with ``features`` (training
    options such as ``model_features``) passed through. Raises LayoutError when the layout does
    not fit the model, ModelConfigError when megatron-core's own checks refuse the shape."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_model_fits(cfg, tp, pp)
    bf16, fp16 = params_dtype == torch.bfloat16, params_dtype == torch.float16
    try:
        return TransformerConfig(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            ffn_hidden_size=cfg.ffn_hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_query_groups,
            kv_channels=cfg.hidden_size // cfg.num_attention_heads,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            normalization="RMSNorm",
            layernorm_epsilon=cfg.norm_epsilon,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=cfg.qkv_bias,
            bias_activation_fusion=features.pop("bias_activation_fusion", False),
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=features.pop("apply_rope_fusion", False),
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=cfg.init_method_std,
            use_cpu_initialization=features.pop("use_cpu_initialization", True),
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=bf16,
            fp16=fp16,
            # The (loss_sum, num_tokens) convention: schedules sum token counts over micro-batches and
            # finalize_model_grads divides gradients by the global count (exact across DP and PP).
            calculate_per_token_loss=True,
            batch_p2p_sync=False,
            # gloo runs a "batched" p2p call as separate sends and receives matched in order per
            # peer; under the interleaved schedule at PP2 a rank sends an activation and a gradient
            # to the same peer in one call and the peer posted its receives in the other order, so
            # activations and gradients were swapped (vPP2 x PP2 losses off by 1e-3 from 4
            # micro-batches on). megatron-core's unbatched p2p keeps the two directions on two
            # process groups when the pipeline group has 2 ranks. NCCL keeps megatron's default.
            batch_p2p_comm=torch.cuda.is_available(),
            **features,
        )
    except ValueError as err:  # megatron-core's own checks of the shape
        raise ModelConfigError(str(err)) from None


@functools.lru_cache(maxsize=None)
def _rho_gpt_model_class():
    """megatron-core's GPTModel whose language-model loss is rho's fused per-token loss.

    Called with ``labels``, GPTModel hands its sequence-first logits [s, b, vocab/tp] to
    ``compute_language_model_loss``; without labels it returns them batch-first through a
    ``transpose(0, 1).contiguous()`` copy, whose backward is a second copy (on the tiny model that
    pair cost 50 ms of a 230 ms micro-batch on CPU). Overriding the loss keeps the logits where the
    output layer wrote them: the fused kernel reads them once forward and writes dL/dlogits into the
    same memory, contiguous for the output layer's backward matmuls.
    """
    from megatron.core.models.gpt import GPTModel

    class RhoGPTModel(GPTModel):
        def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            from megatron.core import parallel_state as ps

            from cuda_ext import per_token_loss

            # logits: [s, b, vocab/tp]; labels: [b, s] -> losses [b, s] (fp32)
            s, b, v = logits.shape
            tp = ps.get_tensor_model_parallel_world_size()
            keep, _ = padded_vocab_columns(self.rho_vocab_size, ps.get_tensor_model_parallel_rank() * v, v)
            if keep < v:  # the padding columns leave the softmax: -inf logits, zero gradient
                logits[..., keep:] = float("-inf")
            losses = per_token_loss(
                logits.reshape(s * b, v),
                labels.transpose(0, 1).reshape(-1),
                vocab_start_index=ps.get_tensor_model_parallel_rank() * v,
                tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
                inplace_backward=True,
            )
            return losses.view(s, b).transpose(0, 1).contiguous()

    return RhoGPTModel


def padded_vocab_columns(vocab_size: int, vocab_start: int, v_local: int) -> tuple[int, int]:
    """(columns of the true vocabulary, padding columns) in a TP rank's [vocab_start, vocab_start +
    v_local) slice of the padded vocabulary. The padding rows of the embedding and output layer (zeros
    from a Hugging Face import, random from megatron's initialisation) are not tokens: the training
    loss and the scores leave them out of the softmax, so that an imported model's loss is its own
    cross-entropy and the export, which drops them, is the model that was trained."""
    keep = max(0, min(v_local, vocab_size - vocab_start))
    return keep, v_local - keep


def build_model_chunks(cfg: ModelConfig, shape: ModelShape, tp: int, pp: int, vp: int, features: dict,
                       weights_loaded: bool = False, backend: LayerBackend | None = None) -> list:
    """This rank's model: one ``GPTModel`` per virtual pipeline stage (``vp`` > 1: interleaved 1F1B,
    stage ``i`` holding the layers megatron-core assigns to it), each with its own first/last-stage
    role."""
    from megatron.core import parallel_state as ps

    if vp == 1:
        return [build_model(cfg, shape, tp, pp, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(),
                            features=features, weights_loaded=weights_loaded, backend=backend)]
    return [build_model(cfg, shape, tp, pp, ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i),
                        ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i), features=features, vp_stage=i,
                        weights_loaded=weights_loaded, backend=backend)
            for i in range(vp)]


def build_model(cfg: ModelConfig, shape: ModelShape, tp: int, pp: int, pre_process: bool, post_process: bool,
                features: dict | None = None, vp_stage: int | None = None, weights_loaded: bool = False,
                backend: LayerBackend | None = None):
    """This pipeline stage's ``GPTModel``, built by ``backend`` (default ``layer_backend()``: on the
    CPU, or created on the current GPU). Given ``labels``, the last stage returns per-token losses
    [b, s] from rho's fused kernel (``_rho_gpt_model_class``); without, vocab-parallel logits
    [b, s, vocab/tp] as megatron's GPTModel does. ``weights_loaded``: a checkpoint overwrites every
    weight next."""
    backend = backend or layer_backend()
    config = transformer_config(cfg, tp, pp, shape.params_dtype,
                                **{**backend_features(backend, weights_loaded), **(features or {})})
    model = _rho_gpt_model_class()(
        config=config,
        transformer_layer_spec=block_spec(config, vp_stage, backend),
        vocab_size=shape.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        rope_scaling=cfg.rope_scaling_factor is not None,
        **({"rope_scaling_factor": cfg.rope_scaling_factor} if cfg.rope_scaling_factor is not None else {}),
        **({"vp_stage": vp_stage} if vp_stage is not None else {}),
    )
    model.rho_vocab_size = shape.vocab_size  # the true vocabulary: the loss leaves the padding out
    return model


def block_spec(config, vp_stage: int | None = None, backend: LayerBackend | None = None):
    """This stage's layers: megatron-core's local layer spec (RMSNorm) with rho's two substitutions,
    fused causal attention (PyTorch SDPA, ``parallel.attention``) in place of the unfused
    DotProductAttention and ``parallel.norm.RMSNorm`` (sequence-parallel capable) for every norm,
    the block's final one included; or, with the ``transformer_engine`` backend, the same layer
    shape from Transformer Engine's modules (``_te_layer``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    backend = backend or layer_backend()
    if backend.layer_spec == "transformer_engine":
        layer, final_norm = _te_layer()
    else:
        from parallel.attention import SDPAttention
        from parallel.norm import RMSNorm

        layer, final_norm = get_gpt_layer_local_spec(normalization="RMSNorm"), RMSNorm
        layer.submodules.self_attention.submodules.core_attention = SDPAttention
        layer.submodules.input_layernorm = RMSNorm
        layer.submodules.pre_mlp_layernorm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=final_norm)


def _te_layer():
    """The local spec's layer with Transformer Engine's modules in every place: its RMSNorm, column-
    and row-parallel linears and DotProductAttention (FlashAttention / cuDNN, GQA, sequence
    parallelism built in). megatron-core's own TE spec fuses each norm into the next linear
    (``linear_qkv.layer_norm_weight``); rho keeps the norms apart so that the parameter names, and so
    checkpoints and the Hugging Face name map, are the local spec's on every device."""
    from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear, TEDotProductAttention,
                                                             TENorm, TERowParallelLinear)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention, mlp = layer.submodules.self_attention.submodules, layer.submodules.mlp.submodules
    attention.linear_qkv, attention.core_attention, attention.linear_proj = (
        TEColumnParallelLinear, TEDotProductAttention, TERowParallelLinear)
    mlp.linear_fc1, mlp.linear_fc2 = TEColumnParallelLinear, TERowParallelLinear
    layer.submodules.input_layernorm = TENorm
    layer.submodules.pre_mlp_layernorm = TENorm
    return layer, TENorm


def model_shape(cfg: ModelConfig, vocab_size: int, tp: int, params_dtype: torch.dtype) -> ModelShape:
    return ModelShape(
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab_size(vocab_size, tp, cfg.make_vocab_size_divisible_by),
        params_dtype=params_dtype,
    )


def count_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters of the whole (unsharded, unpadded) model, for banners and MFU."""
    h, f, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    head_dim = h // cfg.num_attention_heads
    qkv = (h + cfg.qkv_bias) * (cfg.num_attention_heads + 2 * cfg.num_query_groups) * head_dim
    attn_out = cfg.num_attention_heads * head_dim * h
    mlp = 3 * h * f
    norms = 2 * h
    vocab_matrices = 1 if cfg.tie_word_embeddings else 2
    return L * (qkv + attn_out + mlp + norms) + h + vocab_matrices * vocab_size * h


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_length: int) -> int:
    """Model FLOPs of one trained token, forward + backward (Megatron-LM / PaLM accounting, no
    recomputation counted): 6 per weight (2 forward, 4 backward) plus 12·layers·hidden·seq for the
    attention scores and their weighted sum, which no weight counts. The one home of the formula:
    ``rho bench train`` and the TFLOP/s and MFU of every training step use it."""
    return 6 * count_parameters(cfg, vocab_size) + 12 * cfg.num_layers * cfg.hidden_size * seq_length
