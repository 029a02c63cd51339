"""Which kind (``rhocli.demo.corpus.KINDS``) every stored token of a demo dataset is.

A token takes the kind of the first non-space character it covers. The demo's tokenizer does no text
normalisation, so its pieces spell the document exactly and give each token's character offsets. The labels are checked against the token store: re-encoding a document must give
exactly its stored ids (plus the appended EOD), otherwise the labels would be silently misaligned.
"""

from __future__ import annotations

import numpy as np

from rhocli.demo.corpus import KINDS, Document


class LabelMismatch(ValueError):
    """The token store does not hold these documents tokenized with this tokenizer."""


def token_kinds(sp_model_path: str, documents: list[Document], token_docs: list[np.ndarray]) -> list[np.ndarray]:
    """[len(doc tokens)] kind index (into KINDS) per token of each stored document.

    ``token_docs[d]`` is document ``d`` as stored (its ids, then the EOD id); the EOD gets the kind of
    the document's last character.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model_path)
    kind_index = {k: i for i, k in enumerate(KINDS)}
    out = []
    for d, (doc, stored) in enumerate(zip(documents, token_docs)):
        text = doc.text
        char_kinds = [kind_index[k] for k in doc.char_kinds()]
        ids = sp.encode(text)
        pieces = [sp.id_to_piece(i).replace("\u2581", " ") for i in ids]
        if list(stored[: len(ids)]) != ids or len(stored) not in (len(ids), len(ids) + 1):
            raise LabelMismatch(f"document {d}: stored tokens differ from this tokenizer's encoding")
        joined = "".join(pieces)
        # The demo tokenizer does no normalisation, so the pieces spell the text (after the dummy
        # prefix space SentencePiece adds); anything else would misplace every label after it.
        shift = len(joined) - len(text)
        if shift not in (0, 1) or joined[shift:] != text:
            raise LabelMismatch(f"document {d}: the tokenizer normalises text; train it with identity normalisation")
        kinds, pos = [], -shift
        for piece in pieces:
            span = range(max(pos, 0), min(pos + len(piece), len(text)))
            first = next((i for i in span if not text[i].isspace()), span.start if len(span) else max(min(pos, len(text) - 1), 0))
            kinds.append(char_kinds[first] if char_kinds else 0)
            pos += len(piece)
        if len(stored) == len(ids) + 1:
            kinds.append(char_kinds[-1] if char_kinds else 0)
        out.append(np.asarray(kinds, dtype=np.int8))
    return out
