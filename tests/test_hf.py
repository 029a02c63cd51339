"""Hugging Face -> rho: a model built with `transformers` (random tiny Llama and Mistral with GQA,
untied embeddings) is imported with rho convert-hf --from-hf, or given to rho score --model as the
HF directory itself; rho score's per-token losses must equal transformers' own per-token
cross-entropy on the same windows, at TP1PP1 and TP2PP2."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CORPUS, write_jsonl
from rho_cli import run_rho
from hf_models import tiny_hf_model as _hf_model
from train_utils import rho

pytestmark = pytest.mark.slow

WINDOW, STRIDE = 64, 32


def _hf_scores(model, doc: list[int], eod: int) -> np.ndarray:
    """transformers' per-token CE with rho's documented window policy ([EOD] first, sliding window)."""
    ext = [eod] + doc
    n = len(doc)
    out = np.full(n, np.nan)
    start, scored = 0, 0
    while scored < n:
        end = min(start + WINDOW, n)
        with torch.no_grad():
            logits = model(torch.tensor([ext[start:end]])).logits[0].float()
        ce = F.cross_entropy(logits, torch.tensor(ext[start + 1:end + 1]), reduction="none").numpy()
        out[scored:end] = ce[scored - start:]
        scored = end
        start += STRIDE
    return out


# each architecture once and each source once (the pairs cover both of each; the four-way product
# repeated the same code paths for 75 s of the suite)
@pytest.mark.parametrize("kind,source", [("llama", "convert-hf"), ("mistral", "hf-dir"), ("qwen2", "hf-dir")])
def test_scores_equal_transformers_cross_entropy(tmp_path, hf_tokenizer_dir, kind, source):
    """source convert-hf: rho score --model on the imported checkpoint; hf-dir: --model HF_DIR (each
    rank loads its own TP/PP shard of the HF tensors, no conversion)."""
    import json

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    hf_dir = tmp_path / "hf"
    model = _hf_model(kind, hf_dir, hf_tokenizer_dir)
    docs = [{"text": " ".join(CORPUS[(i * 3 + j) % len(CORPUS)] for j in range(1 + i % 5))} for i in range(24)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    rho("tokenize", tmp_path / "c.jsonl", "-t", hf_dir, "-o", tmp_path / "c", "-w", "1")
    if source == "convert-hf":
        rho("convert-hf", "--from-hf", hf_dir, tmp_path / "ckpt")
    reference = tmp_path / "ckpt" if source == "convert-hf" else hf_dir
    for layout in ((), ("--tp", "2", "--pp", "2")):
        out = tmp_path / ("s" + "".join(layout))
        rho("score", "--model", reference, "--data", tmp_path / "c", "--output", out,
            "--seq-len", WINDOW, "--stride", STRIDE, "-q", *layout, timeout=600)
        described = json.loads((tmp_path / f"{out.name}.json").read_text())["reference_model"]
        if source == "hf-dir":
            assert described["huggingface"] == str(hf_dir.resolve()) and described["architecture"] == kind
            assert described["fingerprint"].startswith("sha256:")
        tokens, scores = IndexedDataset(str(tmp_path / "c")), IndexedDataset(str(out))
        longest = 0
        for i in range(len(tokens)):
            doc = tokens[i].astype(np.int64).tolist()
            longest = max(longest, len(doc))
            expected = _hf_scores(model, doc, eod=0)
            assert np.abs(scores[i] - expected).max() < 1e-4, (layout, i)
        assert longest > WINDOW  # the sliding window was exercised


def test_unsupported_models_are_refused(tmp_path, hf_tokenizer_dir, capsys):
    """Refused before anything is written, in one line (in-process: each refusal is a plain exit)."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, attention_bias=True, mlp_bias=True,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    r = run_rho(capsys, "convert-hf", "--from-hf", tmp_path / "tied", tmp_path / "o")
    assert r.exit_code == 4 and all(k in r.stderr for k in ("attention_bias", "mlp_bias", "rope_type yarn")), r.stderr
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    r = run_rho(capsys, "convert-hf", "--from-hf", tmp_path / "gpt2", tmp_path / "o")
    assert r.exit_code == 4 and "not supported" in r.stderr
    r = run_rho(capsys, "convert-hf", "--from-hf", tmp_path / "nope", tmp_path / "o")
    assert r.exit_code == 3
    # rho score --model takes a rho checkpoint or a HF Llama/Mistral directory; anything else is one line
    (tmp_path / "empty").mkdir()
    for bad, code, words in (("empty", 3, ["neither a rho checkpoint", "config.json"]), ("gpt2", 4, ["not supported"]),
                             ("tied", 4, ["attention_bias", "yarn"]), ("nope", 3, ["not found"])):
        r = run_rho(capsys, "score", "--model", tmp_path / bad, "--data", tmp_path / "d", "--output", tmp_path / "s")
        message = r.stderr.strip()
        assert r.exit_code == code and message.startswith("error: --model") and len(message.splitlines()) == 1, (bad, message)
        assert all(w in message for w in words) and "Traceback" not in r.stderr, (bad, message)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ok")
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "ok" / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = run_rho(capsys, "convert-hf", "--from-hf", tmp_path / "ok", tmp_path / "o")
    assert r.exit_code == 4 and "model.safetensors" in r.stderr
    assert not (tmp_path / "o").exists()


def test_export_round_trip_reshard_and_trained_model(tmp_path, llama_tp2pp2):
    """HF -> rho -> (saved at TP2PP2) -> HF is tensor-exact; a model trained by rho train exports,
    loads with no missing/unexpected keys, its transformers CE equals rho score's, generate runs."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    hf_dir, config, shape = llama_tp2pp2.hf_dir, llama_tp2pp2.config, llama_tp2pp2.shape
    original = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    rho("convert-hf", llama_tp2pp2.tp2pp2, tmp_path / "back", "--dtype", "fp32", "--tokenizer", hf_dir)
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "back" / "tokenizer.json").is_file()

    # a few real training steps, then export: transformers' CE == rho score's
    rho("train", config, "--data", llama_tp2pp2.data, "--init", llama_tp2pp2.ckpt, "--save", tmp_path / "trained",
        "--steps", 3, "-q", *shape)
    rho("convert-hf", tmp_path / "trained", tmp_path / "trained_hf", "--dtype", "fp32", "--tokenizer", hf_dir)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained_hf").eval()
    rho("score", "--model", tmp_path / "trained", "--data", llama_tp2pp2.data, "--output", tmp_path / "s",
        "--seq-len", WINDOW, "--stride", STRIDE, "-q")
    tokens, scores = IndexedDataset(str(llama_tp2pp2.data)), IndexedDataset(str(tmp_path / "s"))
    for i in range(5):
        doc = tokens[i].astype(np.int64).tolist()
        assert np.abs(scores[i] - _hf_scores(trained, doc, eod=0)).max() < 1e-4
    assert not all(torch.equal(a[k], trained.state_dict()[k]) for k in a)  # it did train
    out = trained.generate(torch.tensor([[0, 5, 6]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_export_shards_with_an_index(tmp_path, hf_tokenizer_dir):
    import json

    from transformers import AutoModelForCausalLM

    from rhocli.convert.hf import export_hf

    hf_dir = tmp_path / "hf"
    original = _hf_model("mistral", hf_dir, hf_tokenizer_dir)
    rho("convert-hf", "--from-hf", hf_dir, tmp_path / "ckpt")
    result = export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), dtype="fp32", max_shard_bytes=200_000)
    assert result["shards"] > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    # the token ids are the source model's (config.json and generation_config.json alike)
    source_cfg = json.loads((hf_dir / "config.json").read_text())
    for name in ("config.json", "generation_config.json"):
        exported = json.loads((tmp_path / "out" / name).read_text())
        assert (exported["bos_token_id"], exported["eos_token_id"]) == (source_cfg["bos_token_id"], source_cfg["eos_token_id"]) == (1, 0)
    assert "tokenizer.json" in result["tokenizer_files"]  # from the HF model the checkpoint came from
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(back).__name__ == "MistralForCausalLM" and not info["missing_keys"] and not info["unexpected_keys"]
    a, b = original.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = rho("convert-hf", tmp_path / "ckpt", tmp_path / "out", check=False)
    assert r.returncode == 5


KINDS = ("llama", "mistral", "llama3", "qwen2")


def test_logits_equal_transformers(tmp_path, hf_tokenizer_dir):
    """HF -> rho, for each family: rho's logits (vocab-parallel shards gathered) equal transformers'
    logits within 1e-4 at TP1PP1 and TP2PP2; and the rho -> HF export gives transformers the same
    logits, tensor-exact weights. (One torchrun launch per layout serves the four models.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from rhocli.core.launch import free_port

    models, expected, jobs = {}, {}, {}
    for kind in KINDS:
        d = tmp_path / kind
        models[kind] = _hf_model(kind, d / "hf", hf_tokenizer_dir)
        rho("convert-hf", "--from-hf", d / "hf", d / "ckpt")
        tokens = torch.randint(0, models[kind].config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
        torch.save(tokens, d / "tokens.pt")
        with torch.no_grad():
            expected[kind] = models[kind](tokens).logits.float()
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    for tp, pp in ((1, 1), (2, 2)):
        jobs = [str(p) for kind in KINDS for p in (tmp_path / kind / "ckpt", tmp_path / kind / "tokens.pt",
                                                    tmp_path / kind / f"logits_{tp}{pp}.pt")]
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * pp), "--master-port",
             str(free_port()), str(root / "tests" / "logits_worker.py"), str(tp), str(pp), *jobs],
            capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for kind in KINDS:
            got = torch.load(tmp_path / kind / f"logits_{tp}{pp}.pt")
            assert got.shape == expected[kind].shape, kind
            assert (got - expected[kind]).abs().max() < 1e-4, (kind, tp, pp, float((got - expected[kind]).abs().max()))
    for kind in KINDS:
        d, model = tmp_path / kind, models[kind]
        rho("convert-hf", d / "ckpt", d / "back", "--dtype", "fp32")
        back = AutoModelForCausalLM.from_pretrained(d / "back").eval()
        assert type(back) is type(model) and back.config.tie_word_embeddings == model.config.tie_word_embeddings, kind
        tokens = torch.load(d / "tokens.pt")
        with torch.no_grad():
            assert (back(tokens).logits.float() - torch.load(d / "logits_11.pt")).abs().max() < 1e-4, kind
        # tensor-exact both ways (the export of the converted checkpoint is the HF model itself)
        a, b = model.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


def test_export_of_a_trained_model_loads_whole(tmp_path, llama2_sp, gsm8k, tiny_data, capsys):
    """A model rho trained on SentencePiece-tokenized text exports as a complete HF directory, with no
    --tokenizer (the data's tokenizer is remembered): the BOS and EOS ids of that tokenizer (ground
    truth: sentencepiece itself); a tokenizer transformers loads with AutoTokenizer that encodes GSM8K
    token-identically to sentencepiece; a model AutoModelForCausalLM loads and greedy generate runs.
    A tokenizer with more tokens than the model's vocabulary is refused, nothing written."""
    import json

    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train_utils import write_tiny_config

    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS])
    rho("tokenize", tmp_path / "c.jsonl", "-t", llama2_sp, "-o", tmp_path / "c", "-w", "1")
    rho("train", write_tiny_config(tmp_path), "--data", tmp_path / "c", "--save", tmp_path / "run", "--steps", 2, "-q")
    rho("convert-hf", tmp_path / "run", tmp_path / "hf", "--dtype", "fp32")
    sp = spm.SentencePieceProcessor(model_file=str(llama2_sp))
    for name in ("config.json", "generation_config.json"):
        exported = json.loads((tmp_path / "hf" / name).read_text())
        assert (exported["bos_token_id"], exported["eos_token_id"]) == (sp.bos_id(), sp.eos_id()) == (1, 2), name
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = [json.loads(line)["question"] + "  " + json.loads(line)["answer"]
             for line in gsm8k.read_text().splitlines()[:300]]
    assert all(tok(t, add_special_tokens=False).input_ids == sp.encode(t) for t in texts)
    assert tok("Natalia sold clips").input_ids[0] == sp.bos_id()  # a Llama tokenizer starts with BOS
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = tok("Natalia sold 48 clips", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=sp.eos_id())
    assert out.shape == (1, prompt.input_ids.shape[1] + 5)
    # a model of the 400-token BPE vocabulary cannot ship the 32k SentencePiece tokenizer
    (tmp_path / "small").mkdir()
    rho("train", write_tiny_config(tmp_path / "small"), "--data", tiny_data, "--save", tmp_path / "small" / "run",
        "--steps", 2, "-q")
    r = run_rho(capsys, "convert-hf", tmp_path / "small" / "run", tmp_path / "bad", "--tokenizer", llama2_sp)
    assert r.exit_code == 6 and "32000 tokens, more than the model's vocabulary of 400" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()


def test_broken_hf_directories_are_one_line(tmp_path, hf_tokenizer_dir):
    """A missing shard is named as missing (exit 3); tensors that do not fit config.json are a load
    error (exit 9) in one line, for convert-hf and score alike; nothing is written."""
    import json

    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    _hf_model("llama", hf_dir, hf_tokenizer_dir)
    AutoModelForCausalLM.from_pretrained(hf_dir).save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    r = rho("convert-hf", "--from-hf", tmp_path / "sharded", tmp_path / "o", check=False)
    assert r.returncode == 3 and f"{shards[1]}: missing (named by model.safetensors.index.json)" in r.stderr, r.stderr
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 96  # the tensors are 160 wide
    (hf_dir / "config.json").write_text(json.dumps(config))
    r = rho("convert-hf", "--from-hf", hf_dir, tmp_path / "o", check=False)
    message = r.stderr.strip()
    assert r.returncode == 9 and "tensors do not match config.json" in message and len(message.splitlines()) == 1, message
    assert not (tmp_path / "o").exists()


def test_train_init_from_a_hf_directory_equals_init_from_its_conversion(tmp_path, hf_tokenizer_dir, tiny_data, capsys):
    """``rho train --init HF_DIR`` (each rank reading its own shards) trains as the run
    started from ``rho convert-hf --from-hf`` of the same directory does at TP1: losses, gradient norms
    and final weights within 1e-5. Qwen2 with biases and tied embeddings: the hardest map. A run whose
    model differs from the directory's is refused before anything starts."""
    import dataclasses
    import json

    import yaml

    from parallel.hf import model_config_from_hf
    from train_utils import TINY_MODEL_YAML, grad_norms, losses, model_tensors

    hf_dir = tmp_path / "hf"
    _hf_model("qwen2", hf_dir, hf_tokenizer_dir)
    rho("convert-hf", "--from-hf", hf_dir, tmp_path / "ckpt")
    model = dataclasses.asdict(model_config_from_hf(json.loads((hf_dir / "config.json").read_text())))
    run = yaml.safe_load(TINY_MODEL_YAML)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": model, "train": run["train"]}))
    common = (tmp_path / "run.yaml", "--data", tiny_data, "--steps", 3, "-q")
    rho("train", *common, "--init", tmp_path / "ckpt", "--save", tmp_path / "a")
    # TP2 x PP2, and PP2 with two virtual stages (each rank two non-adjacent layers: their HF indices
    # come from the model chunks themselves)
    for name, layout in (("b", ("--tp", 2, "--pp", 2)), ("v", ("--pp", 2, "--virtual-pp", 2))):
        rho("train", *common, "--init", hf_dir, "--save", tmp_path / name, *layout, timeout=600)
        assert sorted(losses(tmp_path / name)) == [1, 2, 3]
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "a"), abs=1e-5)
        assert grad_norms(tmp_path / name) == pytest.approx(grad_norms(tmp_path / "a"), abs=1e-5)
        a, b = model_tensors(tmp_path / "a" / "step_000003"), model_tensors(tmp_path / name / "step_000003")
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-5 for k in a)
    # (the weights a TP2 x PP2 run saves from --init HF_DIR are checked above against the conversion's
    # run; its export, tensor-exact and still Qwen2, is test_logits_equal_transformers' and
    # test_export_round_trip_reshard_and_trained_model's)
    (tmp_path / "untied.yaml").write_text(yaml.safe_dump({"model": {**model, "tie_word_embeddings": False},
                                                          "train": run["train"]}))
    r = run_rho(capsys, "train", tmp_path / "untied.yaml", "--data", tiny_data, "--init", hf_dir, "--save", tmp_path / "c")
    assert r.exit_code == 6 and "tie_word_embeddings (True vs False)" in r.stderr, r.stderr
    assert not (tmp_path / "c").exists()
