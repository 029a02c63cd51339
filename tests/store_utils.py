"""Score stores written directly in tests (values chosen by the test), in rho's store format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_score_store(prefix: Path, token_prefix: Path, values_per_doc: list[np.ndarray], fingerprint: str) -> None:
    """A ``rho.scores`` store of ``values_per_doc`` for the token dataset ``token_prefix``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.float32)
    for v in values_per_doc:
        builder.add_document(v.astype(np.float32), [len(v)])
    builder.finalize(str(prefix) + ".idx")
    from rhocli.core.formats.manifest import store_fingerprint

    # the content's own fingerprint: rho train and rho select hash every store they read
    Path(str(prefix) + ".json").write_text(json.dumps({
        "format": "rho.scores", "format_version": 1, "fingerprint": store_fingerprint(prefix),
        "token_dataset": {"prefix": str(token_prefix), "fingerprint": fingerprint},
    }))
