"""Tokenizers rho can read: a SentencePiece ``.model`` file, or a Hugging Face fast tokenizer
(a directory holding ``tokenizer.json``, or that file itself).

rho never adds special tokens implicitly: ``encode_batch`` returns exactly what the tokenizer's own
``encode`` gives without special tokens (SentencePiece ``encode(text)``, HF
``encode(text, add_special_tokens=False)``). BOS / EOD are added by the stage that asks for them.

The fingerprint is the sha256 of the file that defines the tokenizer (the ``.model`` file or
``tokenizer.json``): two tokenizers with the same fingerprint produce the same ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal

from rhocli.core.errors import LoadError, MissingInputError
from rhocli.core.fingerprint import file_sha256

TokenizerKind = Literal["sentencepiece", "huggingface"]

# Names tried, in order, when a HF tokenizer's config does not say which token ends a document.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "[SEP]")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """What a token dataset records about the tokenizer that made it."""

    kind: TokenizerKind
    path: str
    fingerprint: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    #: the id appended after every document (``--append-eod``); the EOS token for both kinds.
    eod_id: int | None
    pad_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Tokenizer:
    """A loaded tokenizer: ``encode_batch`` plus the ids a dataset records."""

    info: TokenizerInfo

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, on one thread (callers parallelise with processes)."""
        raise NotImplementedError

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids ``encode_batch([text])[0]`` gives, and each token's span [start, end) in characters
        of ``text``. A piece that stands for no character of its own (SentencePiece's byte pieces before
        the one that completes a multi-byte character) has an empty span at the character it starts."""
        raise NotImplementedError

    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (Jinja source), or None when it has none."""
        return None

    def special_token_strings(self) -> dict[str, str]:
        """bos_token / eos_token / pad_token as text, for a chat template."""
        return {}

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: Path):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as err:
            raise LoadError(f"{model_file}: not a loadable SentencePiece model ({_first_line(err)})") from err

        def opt(i: int) -> int | None:
            return None if i < 0 else i

        eos = opt(self._sp.eos_id())
        self.info = TokenizerInfo(
            kind="sentencepiece",
            path=str(model_file),
            fingerprint=file_sha256(model_file),
            vocab_size=self._sp.vocab_size(),
            bos_id=opt(self._sp.bos_id()),
            eos_id=eos,
            eod_id=eos,
            pad_id=opt(self._sp.pad_id()),
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # num_threads defaults to every core in sentencepiece; rho's workers are the parallelism.
        return self._sp.encode(texts, num_threads=1)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # sentencepiece reports UTF-8 byte offsets: map them to characters
        proto = self._sp.encode(text, out_type="proto")
        char_of_byte = [0] * (len(text.encode("utf-8")) + 1)
        b = 0
        for i, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            char_of_byte[b:b + n] = [i] * n
            b += n
        char_of_byte[b] = len(text)
        return ([p.id for p in proto.pieces],
                [(char_of_byte[p.begin], char_of_byte[p.end]) for p in proto.pieces])

    def special_token_strings(self) -> dict[str, str]:
        ids = {"bos_token": self.info.bos_id, "eos_token": self.info.eos_id, "pad_token": self.info.pad_id}
        return {k: self._sp.id_to_piece(v) for k, v in ids.items() if v is not None}

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, tokenizer_json: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(tokenizer_json))
        except Exception as err:  # the Rust side raises a bare Exception subclass
            raise LoadError(f"{tokenizer_json}: not a loadable tokenizer.json ({_first_line(err)})") from err
        special = _hf_special_tokens(tokenizer_json.parent)
        self._special = special
        bos = self._token_id(special.get("bos_token"), _BOS_CANDIDATES)
        eos = self._token_id(special.get("eos_token"), _EOS_CANDIDATES)
        pad = self._token_id(special.get("pad_token"), ())
        self.info = TokenizerInfo(
            kind="huggingface",
            path=str(tokenizer_json),
            fingerprint=file_sha256(tokenizer_json),
            vocab_size=self._tok.get_vocab_size(with_added_tokens=True),
            bos_id=bos,
            eos_id=eos,
            eod_id=eos,
            pad_id=pad,
        )

    def _token_id(self, configured: str | None, candidates: tuple[str, ...]) -> int | None:
        for name in ((configured,) if configured else ()) + candidates:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch runs on the Rust pool; tokenize workers pin it to one thread (RAYON_NUM_THREADS).
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._tok.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def chat_template(self) -> str | None:
        return _hf_chat_template(Path(self.info.path).parent)

    def special_token_strings(self) -> dict[str, str]:
        return dict(self._special)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""


def _hf_special_tokens(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings from tokenizer_config.json / special_tokens_map.json, if present."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise LoadError(f"{path}: not valid JSON ({_first_line(err)})") from err
        for key in ("bos_token", "eos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def _hf_chat_template(directory: Path) -> str | None:
    """The chat template a HF tokenizer directory holds: ``chat_template.jinja`` (transformers >= 4.50
    writes it) or ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates: the
    ``default`` one)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError) as err:
        raise LoadError(f"{config}: not valid JSON ({_first_line(err)})") from err
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_tokenizer_path(path: str | os.PathLike) -> tuple[TokenizerKind, Path]:
    """Which kind of tokenizer ``path`` names, and the file that defines it."""
    p = Path(path)
    if not p.exists():
        raise MissingInputError(f"{p}: tokenizer not found")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return "huggingface", p / "tokenizer.json"
        if (p / "tokenizer.model").is_file():
            return "sentencepiece", p / "tokenizer.model"
        raise LoadError(f"{p}: directory holds neither tokenizer.json nor tokenizer.model")
    if p.suffix == ".json":
        return "huggingface", p
    if p.suffix == ".model":
        return "sentencepiece", p
    raise LoadError(f"{p}: not a tokenizer (expected a SentencePiece .model, a tokenizer.json or a HF tokenizer directory)")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    kind, file = resolve_tokenizer_path(path)
    file = file.resolve()  # manifests record where the tokenizer is, independent of the working directory
    if not os.access(file, os.R_OK):
        raise MissingInputError(f"{file}: tokenizer file is not readable")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(file)
    return HuggingFaceTokenizer(file)


def display_pieces(tokenizer_path: str | os.PathLike | None, ids: list[int]) -> list[str]:
    """Each id as the text it stands for, for an HTML token view (SentencePiece's ▁ and byte pieces,
    byte-level BPE's Ġ/Ċ made readable); ``[id]`` when the tokenizer cannot be loaded: a report must
    not fail because a tokenizer moved."""
    if tokenizer_path and Path(tokenizer_path).exists():
        try:
            tok = load_tokenizer(tokenizer_path)
            out = []
            for i in ids:
                piece = tok.id_to_piece(int(i))
                if piece.startswith("<0x") and piece.endswith(">"):
                    try:
                        piece = bytes([int(piece[3:-1], 16)]).decode("utf-8", errors="replace")
                    except ValueError:
                        pass
                out.append(piece.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n"))
            return out
        except Exception:
            pass
    return [f"[{i}]" for i in ids]
