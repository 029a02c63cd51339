"""Hugging Face Llama / Mistral <-> megatron-core GPTModel weights (the Llama flavour rho builds).

Name map for layer i (megatron module keys; HF keys under ``model.``):

    embedding.word_embeddings.weight                      embed_tokens.weight        (rows padded)
    decoder.layers.i.input_layernorm.weight               layers.i.input_layernorm.weight
                      (stored in checkpoints as self_attention.linear_qkv.layer_norm_weight)
    decoder.layers.i.self_attention.linear_qkv.weight     q_proj, k_proj, v_proj     (interleaved, below)
    decoder.layers.i.self_attention.linear_proj.weight    layers.i.self_attn.o_proj.weight
    decoder.layers.i.pre_mlp_layernorm.weight             layers.i.post_attention_layernorm.weight
                      (stored in checkpoints as mlp.linear_fc1.layer_norm_weight)
    decoder.layers.i.mlp.linear_fc1.weight                cat(gate_proj, up_proj)    (SwiGLU: gate first)
    decoder.layers.i.mlp.linear_fc2.weight                layers.i.mlp.down_proj.weight
    decoder.final_layernorm.weight                        norm.weight
    output_layer.weight                                   lm_head.weight             (rows padded)

megatron stores QKV per KV group: for each of the ``g`` groups, its ``h/g`` query heads, then its key
head, then its value head (each ``head_dim`` rows). HF keeps q, k, v separate with heads in order.
Both use RoPE on the two halves of each head (no permutation needed). Padding rows of the vocabulary
are zeros on import and dropped on export.

``megatron_state_from_hf`` builds the whole (TP1 PP1) state that ``rho convert-hf --from-hf`` saves;
``local_megatron_state_from_hf`` builds one rank's shard of it directly (its pipeline stage's layers,
its tensor-parallel slices), which is how ``rho score --model HF_DIR`` loads a HF model with no
conversion. Tensor-parallel slicing follows megatron-core's layers: column-parallel weights
(embedding, output layer, QKV, fc1) are split by rows into ``tp`` contiguous chunks (the per-group QKV
layout keeps whole KV groups on a rank), row-parallel weights (attention output, fc2) by columns, and
fc1 holds ``[gate chunk; up chunk]`` of this rank (megatron's SwiGLU splits its local output in two).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from parallel.config import ModelConfig

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}


class HFConversionError(ValueError):
    """An HF model rho refuses to convert (unsupported architecture or option), or broken files."""


def model_config_from_hf(config: dict) -> ModelConfig:
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    model_type = config.get("model_type")
    if arch is None and model_type not in ("llama", "mistral"):
        raise HFConversionError(f"architecture {archs or model_type} is not supported (Llama and Mistral are)")
    kind = SUPPORTED.get(arch) or model_type
    problems = []
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("biases (attention_bias / mlp_bias)")
    if config.get("tie_word_embeddings"):
        problems.append("tied input/output embeddings")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {config.get('hidden_act')}")
    rope_params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or ({} if rope_params.get("rope_type", "default") == "default" else rope_params)
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        problems.append(f"rope scaling {scaling.get('rope_type') or scaling.get('type')}")
    heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim * heads != config["hidden_size"]:
        problems.append("head_dim * num_attention_heads != hidden_size")
    if problems:
        raise HFConversionError("unsupported option(s): " + ", ".join(problems))
    theta = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))
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
    )


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q [h*d, H], k [g*d, H], v [g*d, H] -> megatron linear_qkv [(h + 2g) * d, H]."""
    d = k.shape[0] // groups
    per = q.shape[0] // (groups * d)  # query heads per group
    qg = q.view(groups, per * d, -1)
    kg = k.view(groups, d, -1)
    vg = v.view(groups, d, -1)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, q.shape[-1])


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``interleave_qkv``."""
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


def megatron_state_from_hf(get: Callable[[str], torch.Tensor], cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype) -> dict:
    """megatron GPTModel (TP1 PP1) module state dict from HF tensors (``get(name)``)."""
    sd = {
        "embedding.word_embeddings.weight": _pad_rows(get("model.embed_tokens.weight"), padded_vocab),
        "decoder.final_layernorm.weight": get("model.norm.weight"),
        "output_layer.weight": _pad_rows(get("lm_head.weight"), padded_vocab),
    }
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        m = f"decoder.layers.{i}."
        sd[m + "input_layernorm.weight"] = get(p + "input_layernorm.weight")
        sd[m + "self_attention.linear_qkv.weight"] = interleave_qkv(
            get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"), get(p + "self_attn.v_proj.weight"),
            cfg.num_query_groups)
        sd[m + "self_attention.linear_proj.weight"] = get(p + "self_attn.o_proj.weight")
        sd[m + "pre_mlp_layernorm.weight"] = get(p + "post_attention_layernorm.weight")
        sd[m + "mlp.linear_fc1.weight"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], dim=0)
        sd[m + "mlp.linear_fc2.weight"] = get(p + "mlp.down_proj.weight")
    return {k: v.to(dtype) for k, v in sd.items()}


def local_megatron_state_from_hf(get: Callable[[str], torch.Tensor], cfg: ModelConfig, padded_vocab: int,
                                 dtype: torch.dtype, tp: int, tp_rank: int, pp: int, pp_rank: int) -> dict:
    """The module state dict of one rank's GPTModel (pipeline stage ``pp_rank``, TP slice ``tp_rank``)
    from HF tensors; equal to loading the converted checkpoint at that layout."""

    def rows(t: torch.Tensor) -> torch.Tensor:  # column-parallel: output features split
        return t.chunk(tp, dim=0)[tp_rank].contiguous()

    def cols(t: torch.Tensor) -> torch.Tensor:  # row-parallel: input features split
        return t.chunk(tp, dim=1)[tp_rank].contiguous()

    per_stage = cfg.num_layers // pp
    sd = {}
    if pp_rank == 0:
        sd["embedding.word_embeddings.weight"] = rows(_pad_rows(get("model.embed_tokens.weight"), padded_vocab))
    if pp_rank == pp - 1:
        sd["decoder.final_layernorm.weight"] = get("model.norm.weight")
        sd["output_layer.weight"] = rows(_pad_rows(get("lm_head.weight"), padded_vocab))
    for i in range(per_stage):
        p = f"model.layers.{pp_rank * per_stage + i}."
        m = f"decoder.layers.{i}."
        sd[m + "input_layernorm.weight"] = get(p + "input_layernorm.weight")
        sd[m + "self_attention.linear_qkv.weight"] = rows(interleave_qkv(
            get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"), get(p + "self_attn.v_proj.weight"),
            cfg.num_query_groups))
        sd[m + "self_attention.linear_proj.weight"] = cols(get(p + "self_attn.o_proj.weight"))
        sd[m + "pre_mlp_layernorm.weight"] = get(p + "post_attention_layernorm.weight")
        sd[m + "mlp.linear_fc1.weight"] = torch.cat([rows(get(p + "mlp.gate_proj.weight")), rows(get(p + "mlp.up_proj.weight"))])
        sd[m + "mlp.linear_fc2.weight"] = cols(get(p + "mlp.down_proj.weight"))
    return {k: v.to(dtype) for k, v in sd.items()}


def load_hf_into_model(model, directory: Path, cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype,
                       tp: int, tp_rank: int, pp: int, pp_rank: int) -> None:
    """Load this rank's shard of the HF model in ``directory`` into ``model`` (strict: every
    parameter set, no tensor left over). Raises HFConversionError for unreadable or mismatched files."""
    reader = HFReader(directory)
    try:
        state = local_megatron_state_from_hf(reader.get, cfg, padded_vocab, dtype, tp, tp_rank, pp, pp_rank)
    except RuntimeError as err:  # shape mismatch between config.json and the tensors
        raise HFConversionError(f"{directory}: tensors do not match config.json ({str(err).splitlines()[0]})") from None
    expected = {k for k in model.state_dict() if "_extra_state" not in k}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise HFConversionError(f"{directory}: tensors do not map onto the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrong = [k for k, v in model.state_dict().items() if k in state and tuple(v.shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise HFConversionError(f"{directory}: tensors do not match config.json ({k}: {tuple(state[k].shape)} "
                                f"vs {tuple(model.state_dict()[k].shape)})")
    model.load_state_dict(state, strict=False)


class HFReader:
    """Tensor-by-tensor access to a HF checkpoint: model.safetensors (sharded or not) or .bin."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._files: dict[str, Path] = {}
        st_index = self.dir / "model.safetensors.index.json"
        bin_index = self.dir / "pytorch_model.bin.index.json"
        if st_index.is_file() or bin_index.is_file():
            index = json.loads((st_index if st_index.is_file() else bin_index).read_text())
            self._files = {k: self.dir / f for k, f in index["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            self._files = {k: self.dir / "model.safetensors" for k in self._safetensor_keys(self.dir / "model.safetensors")}
        elif (self.dir / "pytorch_model.bin").is_file():
            self._files = {k: self.dir / "pytorch_model.bin" for k in self._bin(self.dir / "pytorch_model.bin")}
        else:
            raise HFConversionError(f"{self.dir}: no model.safetensors or pytorch_model.bin")
        self._bins: dict[Path, dict] = {}

    @staticmethod
    def _safetensor_keys(path: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as err:  # truncated / corrupt header
            raise HFConversionError(f"{path}: unreadable safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err

    def _bin(self, path: Path) -> dict:
        if path not in self._bins:
            try:
                self._bins[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:
                raise HFConversionError(f"{path}: unreadable PyTorch checkpoint ({type(err).__name__})") from err
        return self._bins[path]

    def names(self) -> list[str]:
        return list(self._files)

    def files(self) -> list[Path]:
        """The weight files (and index) this model is read from."""
        files = sorted(set(self._files.values()))
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (self.dir / index).is_file():
                files.insert(0, self.dir / index)
        return files

    def fingerprint(self) -> str:
        """sha256 over config.json and every weight file's name and content (the model's identity)."""
        import hashlib

        digest = hashlib.sha256()
        for path in [self.dir / "config.json", *self.files()]:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        return "sha256:" + digest.hexdigest()

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise HFConversionError(f"{self.dir}: tensor {name} is missing")
        path = self._files[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor(name)
            except Exception as err:
                raise HFConversionError(f"{path}: cannot read tensor {name} (truncated or corrupt file?)") from err
        return self._bin(path)[name]


def hf_tensors_from_checkpoint(step_dir: Path, cfg: ModelConfig, vocab_size: int, dtype: torch.dtype):
    """Yield (HF name, tensor) from a rho checkpoint, one checkpoint tensor at a time.

    Tensors are read unsharded (any TP/PP) with ``parallel.checkpoint.load_model_tensors``; layer
    tensors are stored stacked ``[layers, ...]`` and are split here.
    """
    from parallel.checkpoint import load_model_tensors

    def load(name: str) -> torch.Tensor:
        return load_model_tensors(step_dir, [name])[name]

    yield "model.embed_tokens.weight", load("embedding.word_embeddings.weight")[:vocab_size].to(dtype)
    per_layer = {
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
        "decoder.layers.self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
        "decoder.layers.mlp.linear_fc2.weight": "mlp.down_proj.weight",
    }
    for stored, hf in per_layer.items():
        stacked = load(stored)
        for i in range(cfg.num_layers):
            yield f"model.layers.{i}.{hf}", stacked[i].to(dtype).clone()
        del stacked
    qkv = load("decoder.layers.self_attention.linear_qkv.weight")
    for i in range(cfg.num_layers):
        q, k, v = split_qkv(qkv[i], cfg.num_attention_heads, cfg.num_query_groups)
        yield f"model.layers.{i}.self_attn.q_proj.weight", q.to(dtype)
        yield f"model.layers.{i}.self_attn.k_proj.weight", k.to(dtype)
        yield f"model.layers.{i}.self_attn.v_proj.weight", v.to(dtype)
    del qkv
    fc1 = load("decoder.layers.mlp.linear_fc1.weight")
    for i in range(cfg.num_layers):
        gate, up = fc1[i].chunk(2, dim=0)
        yield f"model.layers.{i}.mlp.gate_proj.weight", gate.to(dtype).contiguous()
        yield f"model.layers.{i}.mlp.up_proj.weight", up.to(dtype).contiguous()
    del fc1
    yield "model.norm.weight", load("decoder.final_layernorm.weight").to(dtype)
    yield "lm_head.weight", load("output_layer.weight")[:vocab_size].to(dtype)


def hf_config(cfg: ModelConfig, vocab_size: int, bos: int | None, eos: int | None, dtype_name: str) -> dict:
    """config.json contents for LlamaForCausalLM / MistralForCausalLM."""
    from transformers import LlamaConfig, MistralConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        hidden_act="silu", initializer_range=cfg.init_method_std, bos_token_id=bos, eos_token_id=eos,
    )
    if cfg.architecture == "mistral":
        config = MistralConfig(sliding_window=cfg.sliding_window, **common)
        config.architectures = ["MistralForCausalLM"]
    else:
        config = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
        config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype_name
    return config
