"""Tiny random Hugging Face models built by transformers itself: the ground truth of the HF tests
(test_hf.py) and of rho eval's generation (test_eval.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def write_bpe_tokenizer(directory, texts, vocab_size: int, eos: str, bos: str) -> Path:
    """A HF fast tokenizer (byte-level BPE, ``eos`` and ``bos`` its special tokens, ids 0 and 1) trained
    on ``texts`` and saved in ``directory`` as transformers reads one (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos, bos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": bos, "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return directory


def tiny_hf_model(kind: str, directory, tokenizer_dir, seed: int | None = None, **overrides):
    """A tiny random model built by transformers: ``llama`` and ``mistral`` (untied, no biases), ``llama3``
    (Llama 3.x RoPE scaling, tied embeddings), ``qwen2`` (q/k/v biases, tied embeddings); the last two with
    a vocabulary of 501, which TP2 does not divide. ``seed`` (default: one per kind) draws the weights;
    ``overrides`` change config fields (e.g. num_key_value_heads)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed({"llama": 1, "mistral": 2, "llama3": 3, "qwen2": 4}[kind] if seed is None else seed)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  eos_token_id=0, bos_token_id=1)
    common.update(overrides)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=10000.0, **common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(rope_theta=1000000.0, sliding_window=4096, **common))
    elif kind == "llama3":  # Llama-3.2-1B's RoPE: theta 500000, llama3 scaling with factor 32
        common.update(vocab_size=501, tie_word_embeddings=True)
        model = LlamaForCausalLM(LlamaConfig(rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}, **common))
    else:
        common.update(vocab_size=501, tie_word_embeddings=True, rms_norm_eps=1e-6)
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1000000.0, **common))
    with torch.no_grad():  # non-trivial norms and biases, so a swapped norm or a lost bias would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(directory)
    shutil.copy(tokenizer_dir / "tokenizer.json", directory / "tokenizer.json")
    return model.eval()
