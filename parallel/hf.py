"""Hugging Face Llama / Mistral / Qwen2 <-> megatron-core GPTModel weights: the one name map, both ways.

``PARAMS`` lists every parameter once: its megatron module key, its key in a rho checkpoint (layers
stored stacked ``[layers, ...]``), its HF key(s) and its ``kind``, which says how HF tensors combine
into the megatron tensor and how tensor parallelism slices it; ``params_for(cfg)`` is the list of a
given model (Qwen2's query/key/value biases; no separate output layer when it is tied to the
embedding):

    kind    HF tensors -> megatron                  TP slice of rank r (of tp)
    norm    one, as is                              replicated
    vocab   one, rows padded to the padded vocab    rows (vocab-parallel)
    row     one, as is                              columns (row-parallel linear: input features)
    qkv     q, k, v interleaved per KV group        rows (whole KV groups per rank)
    glu     [gate; up] (SwiGLU: gate first)         [gate rows r; up rows r]

megatron stores QKV per KV group: for each of the ``g`` groups, its ``h/g`` query heads, then its key
head, then its value head (each ``head_dim`` rows); HF keeps q, k, v separate with heads in order.
Both apply RoPE to the two halves of each head, so no permutation is needed. Padding rows of the
vocabulary are zeros on import and dropped on export.

Import (``local_megatron_state_from_hf``) builds one model chunk's module state (its layers, its TP
slices) directly from HF tensors, so ``rho score --model HF_DIR`` and ``rho train --init HF_DIR``
read only their shard; TP1 PP1 is the whole model (``rho convert-hf --from-hf``). Export (``hf_tensors_from_checkpoint``) inverts
the same table from a checkpoint's unsharded tensors. Tensors come in through ``get(name)`` /
``load(name)`` callables: the engine reads no files itself.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch

from parallel.config import ModelConfig
from parallel.errors import UnsupportedModelError, WeightsMismatchError

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
#: Llama 3.x RoPE scaling: the parameters megatron-core's implementation fixes (the only ones used
#: by Llama 3.1 / 3.2 releases); other values are refused, naming the key
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclasses.dataclass(frozen=True)
class Param:
    #: module state-dict key (a layer's key is relative to ``decoder.layers.{i}.``)
    megatron: str
    #: dist_checkpointing key in a rho checkpoint (a layer's: relative to ``decoder.layers.``, stacked)
    stored: str
    #: HF key(s) (a layer's: relative to ``model.layers.{i}.``)
    hf: tuple[str, ...]
    kind: str
    #: "first" / "last" pipeline stage, or "layer" (every stage, its own layers)
    where: str


PARAMS: tuple[Param, ...] = (
    Param("embedding.word_embeddings.weight", "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", "first"),
    Param("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",), "norm", "layer"),
    Param("self_attention.linear_qkv.weight", "self_attention.linear_qkv.weight",
          ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv", "layer"),
    Param("self_attention.linear_proj.weight", "self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "row", "layer"),
    Param("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), "norm", "layer"),
    Param("mlp.linear_fc1.weight", "mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu", "layer"),
    Param("mlp.linear_fc2.weight", "mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "row", "layer"),
    Param("decoder.final_layernorm.weight", "decoder.final_layernorm.weight", ("model.norm.weight",), "norm", "last"),
    Param("output_layer.weight", "output_layer.weight", ("lm_head.weight",), "vocab", "last"),
)
QKV_BIAS = Param("self_attention.linear_qkv.bias", "self_attention.linear_qkv.bias",
                 ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv", "layer")


def params_for(cfg: ModelConfig) -> tuple[Param, ...]:
    """The parameters of a model of ``cfg``, in ``PARAMS`` order: with Qwen2's query/key/value biases,
    and without the output layer when it is the embedding (megatron-core stores it once, under the
    embedding's key; a last pipeline stage's copy is loaded from the embedding)."""
    out = []
    for p in PARAMS:
        if p.megatron == "output_layer.weight" and cfg.tie_word_embeddings:
            continue
        out.append(p)
        if p.megatron == "self_attention.linear_qkv.weight" and cfg.qkv_bias:
            out.append(QKV_BIAS)
    return tuple(out)


def model_config_from_hf(config: dict) -> ModelConfig:
    """rho's model config for a HF config.json; UnsupportedModelError names the key of what rho does
    not build."""
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    model_type = config.get("model_type")
    if arch is None and model_type not in SUPPORTED.values():
        raise UnsupportedModelError(f"architecture {archs or model_type} is not supported (Llama, Mistral and Qwen2 are)")
    kind = SUPPORTED.get(arch) or model_type
    problems = []
    if kind == "qwen2":  # Qwen2: biases on q/k/v, none elsewhere; a sliding window only if switched on
        if config.get("use_sliding_window"):
            problems.append("use_sliding_window (sliding-window attention)")
    elif config.get("attention_bias"):
        problems.append("attention_bias (an output-projection bias)")
    if config.get("mlp_bias"):
        problems.append("mlp_bias")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')}")
    rope_params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or ({} if rope_params.get("rope_type", "default") == "default" else rope_params)
    rope_type = (scaling.get("rope_type") or scaling.get("type")) if scaling else None
    factor = None
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        for key, fixed in LLAMA3_ROPE_FIXED.items():
            if key in scaling and float(scaling[key]) != fixed:
                problems.append(f"rope_scaling.{key} {scaling[key]} (megatron-core's llama3 scaling fixes {fixed})")
    elif rope_type not in (None, "default"):
        problems.append(f"rope_scaling.rope_type {rope_type}")
    heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim * heads != config["hidden_size"]:
        problems.append("head_dim (head_dim x num_attention_heads != hidden_size)")
    if problems:
        raise UnsupportedModelError("unsupported option(s): " + ", ".join(problems))
    theta = config.get("rope_theta") or rope_params.get("rope_theta") or 10000.0
    return ModelConfig(
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=int(config["hidden_size"]),
        ffn_hidden_size=int(config["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        max_position_embeddings=int(config["max_position_embeddings"]),
        vocab_size=int(config["vocab_size"]),
        architecture=kind,
        rope_theta=float(theta),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-5)),
        init_method_std=float(config.get("initializer_range", 0.02)),
        sliding_window=config.get("sliding_window") if kind == "mistral" else None,
        qkv_bias=kind == "qwen2",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling_factor=factor,
    )


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q [h*d, H], k [g*d, H], v [g*d, H] -> megatron linear_qkv [(h + 2g) * d, H]; biases
    (q [h*d], k, v [g*d]) -> [(h + 2g) * d] the same way."""
    if q.dim() == 1:
        return interleave_qkv(q[:, None], k[:, None], v[:, None], groups)[:, 0]
    d = k.shape[0] // groups
    per = q.shape[0] // (groups * d)  # query heads per group
    qg = q.view(groups, per * d, -1)
    kg = k.view(groups, d, -1)
    vg = v.view(groups, d, -1)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, q.shape[-1])


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``interleave_qkv``."""
    if qkv.dim() == 1:
        return tuple(t[:, 0] for t in split_qkv(qkv[:, None], heads, groups))
    d = qkv.shape[0] // (heads + 2 * groups)
    per = heads // groups
    view = qkv.view(groups, (per + 2) * d, -1)
    q = view[:, : per * d].reshape(heads * d, -1)
    k = view[:, per * d:(per + 1) * d].reshape(groups * d, -1)
    v = view[:, (per + 1) * d:].reshape(groups * d, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = torch.zeros(rows, t.shape[1], dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def _to_megatron(p: Param, hf: list[torch.Tensor], cfg: ModelConfig, padded_vocab: int, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice of the megatron tensor from its HF tensor(s) (tp=1: the whole tensor)."""

    def rows(t: torch.Tensor) -> torch.Tensor:  # column-parallel: output features split
        return t.chunk(tp, dim=0)[tp_rank].contiguous() if tp > 1 else t

    if p.kind == "norm":
        return hf[0]
    if p.kind == "vocab":
        return rows(_pad_rows(hf[0], padded_vocab))
    if p.kind == "row":  # row-parallel: input features split
        return hf[0].chunk(tp, dim=1)[tp_rank].contiguous() if tp > 1 else hf[0]
    if p.kind == "qkv":
        return rows(interleave_qkv(*hf, cfg.num_query_groups))
    if p.kind == "glu":  # megatron's SwiGLU splits its local output in two: [gate chunk; up chunk]
        return torch.cat([rows(hf[0]), rows(hf[1])], dim=0)
    raise AssertionError(p.kind)


def _to_hf(p: Param, full: torch.Tensor, cfg: ModelConfig, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """The HF tensor(s) of an unsharded megatron tensor: the inverse of ``_to_megatron`` at tp=1."""
    if p.kind in ("norm", "row"):
        return (full,)
    if p.kind == "vocab":
        return (full[:vocab_size],)
    if p.kind == "qkv":
        return split_qkv(full, cfg.num_attention_heads, cfg.num_query_groups)
    if p.kind == "glu":
        return tuple(t.contiguous() for t in full.chunk(2, dim=0))
    raise AssertionError(p.kind)


def local_megatron_state_from_hf(get: Callable[[str], torch.Tensor], cfg: ModelConfig, padded_vocab: int,
                                 dtype: torch.dtype, tp: int = 1, tp_rank: int = 0, first: bool = True,
                                 last: bool = True, layer_offset: int = 0, num_layers: int | None = None,
                                 output_copy: bool = False) -> dict:
    """The module state dict of one model chunk (``num_layers`` layers from global layer
    ``layer_offset``; the embedding when ``first``, the final norm and output layer when ``last``; TP
    slice ``tp_rank``) from HF tensors; equal to loading the converted checkpoint at that layout.
    ``output_copy``: a tied output layer kept as its own weight (a last stage that is not the first),
    loaded from the embedding. Defaults: the whole model (``rho convert-hf --from-hf``)."""
    num_layers = cfg.num_layers if num_layers is None else num_layers
    stage = {"first": first, "last": last}
    sd = {}
    if output_copy:
        embedding = PARAMS[0]
        sd["output_layer.weight"] = _to_megatron(embedding, [get(n) for n in embedding.hf], cfg, padded_vocab, tp, tp_rank)
    for p in params_for(cfg):
        if p.where != "layer":
            if stage[p.where]:
                sd[p.megatron] = _to_megatron(p, [get(n) for n in p.hf], cfg, padded_vocab, tp, tp_rank)
            continue
        for i in range(num_layers):
            hf_prefix = f"model.layers.{layer_offset + i}."
            sd[f"decoder.layers.{i}.{p.megatron}"] = _to_megatron(
                p, [get(hf_prefix + n) for n in p.hf], cfg, padded_vocab, tp, tp_rank)
    return {k: v.to(dtype) for k, v in sd.items()}


def load_hf_into_model(model, get: Callable[[str], torch.Tensor], cfg: ModelConfig, padded_vocab: int,
                       dtype: torch.dtype, tp: int = 1, tp_rank: int = 0, source: str = "the HF model") -> None:
    """Load this rank's shard of a HF model (tensors from ``get``) into ``model``, one GPTModel chunk
    (which layers, and whether it holds the embedding or the head, are read from the model itself:
    any PP and virtual-PP layout): every parameter set, no tensor left over, shapes checked.
    ``source`` names the model in messages."""
    layers = model.decoder.layers
    mine = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    try:
        state = local_megatron_state_from_hf(
            get, cfg, padded_vocab, dtype, tp, tp_rank, first=model.pre_process, last=model.post_process,
            layer_offset=layers[0].layer_number - 1 if len(layers) else 0, num_layers=len(layers),
            output_copy=cfg.tie_word_embeddings and "output_layer.weight" in mine)
    except RuntimeError as err:  # shape mismatch between config.json and the tensors
        raise WeightsMismatchError(f"{source}: tensors do not match config.json ({str(err).splitlines()[0]})") from None
    if set(state) != set(mine):
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        raise WeightsMismatchError(f"{source}: tensors do not map onto the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrong = [k for k, v in mine.items() if tuple(v.shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise WeightsMismatchError(f"{source}: tensors do not match config.json ({k}: {tuple(state[k].shape)} "
                                   f"vs {tuple(mine[k].shape)})")
    model.load_state_dict(state, strict=False)


def hf_tensors_from_checkpoint(load: Callable[[str], torch.Tensor], cfg: ModelConfig, vocab_size: int,
                               dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from a rho checkpoint's unsharded tensors (``load(stored name)``, any
    TP/PP), one stored tensor at a time: first-stage parameters, the layers, last-stage parameters."""
    order = [p for w in ("first", "layer", "last") for p in params_for(cfg) if p.where == w]
    for p in order:
        if p.where != "layer":
            for name, t in zip(p.hf, _to_hf(p, load(p.stored), cfg, vocab_size)):
                yield name, t.to(dtype)
            continue
        stacked = load("decoder.layers." + p.stored)
        for i in range(cfg.num_layers):
            for name, t in zip(p.hf, _to_hf(p, stacked[i], cfg, vocab_size)):
                yield f"model.layers.{i}.{name}", t.to(dtype).clone()
        del stacked


def hf_config(cfg: ModelConfig, vocab_size: int, bos: int | None, eos: int | None, dtype_name: str):
    """config.json contents for LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM (a transformers
    config), the architecture the checkpoint's model came from."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu", initializer_range=cfg.init_method_std, bos_token_id=bos, eos_token_id=eos,
    )
    if cfg.rope_scaling_factor is not None:
        common["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **LLAMA3_ROPE_FIXED}
    if cfg.architecture == "mistral":
        config = MistralConfig(sliding_window=cfg.sliding_window, **common)
        config.architectures = ["MistralForCausalLM"]
    elif cfg.architecture == "qwen2":
        config = Qwen2Config(use_sliding_window=False, **common)
        config.architectures = ["Qwen2ForCausalLM"]
    else:
        config = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
        config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype_name
    return config
