"""The tokenizer of an exported model, in transformers' own form (``tokenizer.json``,
``tokenizer_config.json``), so that ``AutoTokenizer.from_pretrained(export)`` loads it.

Where it comes from (``tokenizer_source``): ``--tokenizer`` when given; else the Hugging Face model the
checkpoint was converted from; else the tokenizer the training data was tokenized with (the token
dataset's manifest names its file, and its fingerprint must be the checkpoint's).

A SentencePiece model is converted with transformers' own extractor (``SentencePieceExtractor``) and
``generate_merges``, its BPE merges ordered by the SentencePiece piece scores: transformers 5's
default orders them by id, and for the Llama-2 model, whose ``▁▁`` piece has id 259 but the lowest
score, that tokenized "  How" as ``▁▁ How`` where SentencePiece gives ``▁ ▁How`` (118 of 500 GSM8K
documents differed; with the score order, none).
"""

from __future__ import annotations

from pathlib import Path

from rhocli.core.errors import MismatchError, MissingInputError


def tokenizer_source(tokenizer: str | None, manifest: dict) -> Path | None:
    """The tokenizer to export with a checkpoint (see the module docstring), or None."""
    from rhocli.core.fingerprint import file_sha256
    from rhocli.core.formats.tokens import read_manifest
    from rhocli.core.tokenizers import resolve_tokenizer_path

    if tokenizer:
        p = Path(tokenizer)
        if not p.exists():
            raise MissingInputError(f"--tokenizer {p}: not found")
        return p
    source = (manifest.get("source") or {}).get("huggingface")
    if source and Path(source).is_dir():
        try:
            resolve_tokenizer_path(source)
            return Path(source)
        except Exception:  # a HF directory without a tokenizer: the data's, below
            pass
    for dataset in manifest.get("datasets") or []:
        path = ((read_manifest(dataset["prefix"]) or {}).get("tokenizer") or {}).get("path")
        if path and Path(path).is_file() and file_sha256(Path(path)) == manifest.get("tokenizer_fingerprint"):
            return Path(path)
    return None


def hf_tokenizer(source: Path, vocab_size: int, bos_id: int | None, eos_id: int | None):
    """``source``'s tokenizer as a transformers tokenizer (``save_pretrained`` writes it). Raises
    MismatchError when it has more tokens than the model's vocabulary."""
    from rhocli.core.tokenizers import resolve_tokenizer_path

    kind, file = resolve_tokenizer_path(source)
    tokenizer = _from_sentencepiece(file, bos_id, eos_id) if kind == "sentencepiece" else _from_hf(source, file, bos_id, eos_id)
    if len(tokenizer) > vocab_size:
        raise MismatchError(f"tokenizer {source}: {len(tokenizer)} tokens, more than the model's vocabulary of {vocab_size}")
    return tokenizer


def save_tokenizer(tokenizer, out_dir: Path) -> list[str]:
    """Write it into ``out_dir``; the names of the files written."""
    before = set(p.name for p in out_dir.iterdir())
    tokenizer.save_pretrained(out_dir)
    return sorted(p.name for p in out_dir.iterdir() if p.name not in before)


def _from_sentencepiece(model_file: Path, bos_id: int | None, eos_id: int | None):
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, generate_merges

    extractor = SentencePieceExtractor(str(model_file))
    if extractor.proto.trainer_spec.model_type != 2:  # 2: BPE (Llama, Mistral); 1: unigram
        raise MismatchError(f"tokenizer {model_file}: a SentencePiece {('unigram' if extractor.proto.trainer_spec.model_type == 1 else 'non-BPE')} "
                            "model; export converts BPE ones (pass --tokenizer with a tokenizer.json)")
    parts = extractor.extract(BPE)
    pieces = extractor.proto.pieces
    scores = {p.piece: p.score for p in pieces}

    def piece(i: int | None) -> str | None:
        return pieces[i].piece if i is not None and 0 <= i < len(pieces) else None

    return LlamaTokenizer(vocab=parts["vocab"], merges=generate_merges(parts["vocab"], scores),
                          bos_token=piece(bos_id), eos_token=piece(eos_id),
                          unk_token=piece(extractor.proto.trainer_spec.unk_id), add_bos_token=bos_id is not None)


def _from_hf(source: Path, file: Path, bos_id: int | None, eos_id: int | None):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if source.is_dir() and (source / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(source)
    backend = Tokenizer.from_file(str(file))

    def token(i: int | None) -> str | None:
        return backend.id_to_token(i) if i is not None else None

    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=token(bos_id), eos_token=token(eos_id))
