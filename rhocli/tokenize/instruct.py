"""Instruction data for ``rho tokenize``: a record (prompt/response keys, or a messages list) rendered
with a chat template into one text, the character spans the model is trained on, and from those the
per-token mask that ``rho tokenize`` writes beside the dataset (``PREFIX.mask``, the ``rho.mask``
format that ``rho train --mask`` reads).

The text is tokenized whole, as the model reads it, and a token is trained when its character span
(the tokenizer's own offsets) touches a trained character: the assistant's content and the end of its
turn (the template's suffix, and the EOD id appended after the last assistant message), never the
prompt, the system text or the template's role headers. ``--mask-spans output`` also drops what an
interpreter wrote: the body of every ```output block and its closing fence (the model writes the
```output line, where generation stops and the interpreter takes over; it never writes the result).

Templates: ``plain``, ``tora`` and ``chatml`` are YAML files in ``rhocli/tokenize/templates/`` (a
prefix and a suffix per role); a path to such a file; or ``tokenizer``, the Jinja chat template a
Hugging Face tokenizer directory carries, whose assistant spans are found by rendering the
conversation up to each assistant message (the template must render a conversation's start as a
prefix of the whole, as chat templates do).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
ROLES = ("system", "user", "assistant")
#: the interpreter's part of a tool-integrated solution: after the ```output line, up to and with the
#: closing fence (or to the end of the message when the block is not closed)
OUTPUT_BLOCK = re.compile(r"```output(.*?)(?:```|\Z)", re.DOTALL)
MASK_SPANS = ("output",)


class InstructError(ValueError):
    """A record the options cannot turn into a training example; ``category`` names the problem."""

    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category = category


@dataclasses.dataclass(frozen=True)
class InstructOptions:
    """How records become conversations: ``prompt_key``+``response_key``, or ``messages_key``."""

    prompt_key: str | None = None
    response_key: str | None = None
    messages_key: str | None = None
    template: str = "plain"
    mask_spans: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """The record fields read (parquet columns)."""
        return (self.messages_key,) if self.messages_key else (self.prompt_key, self.response_key)


def messages_of(record: Any, options: InstructOptions) -> list[dict[str, str]]:
    """The conversation in ``record`` (a JSON object, or the parquet columns as a tuple)."""
    if options.messages_key:
        messages = record[0] if isinstance(record, tuple) else _field(record, options.messages_key)
        if not isinstance(messages, list) or not messages:
            raise InstructError("bad-messages", f"key '{options.messages_key}' must be a non-empty list of messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InstructError("bad-messages", f"message {i} of '{options.messages_key}' needs a role "
                                    f"({'/'.join(ROLES)}) and a string content")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise InstructError("empty-response", "no assistant message with content: nothing to train on")
        return out
    if isinstance(record, tuple):
        prompt, response = record
    else:
        prompt, response = _field(record, options.prompt_key), _field(record, options.response_key)
    for key, value in ((options.prompt_key, prompt), (options.response_key, response)):
        if not isinstance(value, str):
            raise InstructError("non-string", f"key '{key}' is {'null' if value is None else type(value).__name__}, not a string")
    if not response.strip():
        raise InstructError("empty-response", f"key '{options.response_key}' is empty: nothing to train on")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _field(record: dict, key: str) -> Any:
    if key not in record:
        raise InstructError("missing-key", f"missing key '{key}' (keys: {', '.join(map(str, record)) or 'none'})")
    return record[key]


# --------------------------------------------------------------------------- templates
@dataclasses.dataclass(frozen=True)
class RoleTemplate:
    """A prefix and a suffix per role (a YAML file). Trained: an assistant's content and suffix."""

    name: str
    roles: dict[str, tuple[str, str]]

    def render(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """(text, trained character spans)."""
        parts, spans, at = [], [], 0
        for m in messages:
            prefix, suffix = self.roles[m["role"]]
            parts += [prefix, m["content"], suffix]
            start = at + len(prefix)
            at = start + len(m["content"]) + len(suffix)
            if m["role"] == "assistant":
                spans.append((start, at))
        return "".join(parts), spans


@dataclasses.dataclass
class JinjaTemplate:
    """A tokenizer's own chat template; the assistant spans come from rendering prefixes."""

    source: str
    special: dict[str, str]
    name: str = "tokenizer"

    def __post_init__(self):
        import json

        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # the environment transformers renders chat templates in (apply_chat_template)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)

        def raise_exception(message):
            raise InstructError("bad-messages", f"the chat template refused the messages: {message}")

        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(self.source)

    def _render(self, messages, generation_prompt: bool) -> str:
        return self._template.render(messages=messages, add_generation_prompt=generation_prompt, **self.special)

    def render(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        text = self._render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], True)
            through = self._render(messages[: i + 1], False)
            if not (through.startswith(before) and text.startswith(through)):
                raise InstructError("bad-messages", "the tokenizer's chat template does not render the conversation's "
                                    "start as a prefix of the whole: its assistant turns cannot be located")
            spans.append((len(before), len(through)))
        return text, spans


def load_template(name: str, tokenizer=None) -> RoleTemplate | JinjaTemplate:
    """``name``: a template in rhocli/tokenize/templates, a path to a YAML file, or ``tokenizer``.
    Raises ValueError with the reason."""
    if name == "tokenizer":
        source = tokenizer.chat_template() if tokenizer is not None else None
        if not source:
            raise ValueError("the tokenizer has no chat template (a Hugging Face tokenizer directory whose "
                             "tokenizer_config.json or chat_template.jinja holds one)")
        return JinjaTemplate(source, tokenizer.special_token_strings())
    path = TEMPLATES_DIR / f"{name}.yaml"
    if not path.is_file():
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"{name!r} is neither a template ({', '.join(template_names())}, tokenizer) nor a YAML file")
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        roles = {r: (str(data["roles"][r].get("prefix", "")), str(data["roles"][r].get("suffix", ""))) for r in ROLES}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a chat template (roles: system/user/assistant, each a prefix and a suffix): {err}") from None
    return RoleTemplate(path.stem, roles)


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.yaml"))


# --------------------------------------------------------------------------- spans -> token mask
def drop_output_blocks(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` without the interpreter's output blocks inside them."""
    out = []
    for start, end in spans:
        at = start
        for block in OUTPUT_BLOCK.finditer(text, start, end):
            body_start = block.start(1)
            if body_start > at:
                out.append((at, body_start))
            at = min(block.end(), end)
        if end > at:
            out.append((at, end))
    return out


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], text_length: int) -> np.ndarray:
    """Bool [tokens]: whether each token's span [start, end) touches a trained character. A token
    with an empty span (a byte piece that completes no character yet) goes with the character at its
    start, as the piece that completes that character does."""
    trained = np.zeros(text_length + 1, dtype=np.int64)
    for start, end in spans:
        trained[start:end] = 1
    before = np.concatenate([[0], np.cumsum(trained)])  # before[i] = trained characters in [0, i)
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
    ends = np.maximum(ends, starts + 1)  # the empty span looks at its next character
    return (before[np.minimum(ends, text_length + 1)] - before[starts]) > 0


def encode_example(record: Any, options: InstructOptions, template, tokenizer) -> tuple[list[int], np.ndarray, bool]:
    """(ids, trained mask [ids], whether the conversation ends with an assistant turn) of one record."""
    messages = messages_of(record, options)
    text, spans = template.render(messages)
    if "output" in options.mask_spans:
        spans = drop_output_blocks(text, spans)
    ids, offsets = tokenizer.encode_offsets(text)
    mask = token_mask(offsets, spans, len(text))
    return ids, mask, messages[-1]["role"] == "assistant"
