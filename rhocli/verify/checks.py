"""``rho verify`` as a library: every check rho can make of a store or a checkpoint, reading every byte.

What each kind gets (the cheap structural checks also run whenever a store is opened; these add the
ones that read the content):

* token dataset (``PREFIX`` with a ``rho.tokens`` manifest, or a Megatron-LM dataset without one): the
  ``.idx``/``.bin`` structure, the manifest's counts, the content fingerprint, ids below the vocabulary;
* score store (``rho.scores``): structure, counts, fingerprint, every value finite, and the token
  dataset it names, when present, has the fingerprint it claims;
* sample score store (``rho.sample_scores``): size, every value finite, fingerprint, and the token
  datasets its pipeline reads, when present, have the fingerprints it claims;
* mask store (``rho.mask``): structure, counts, fingerprint, every value 0 or 1, the token dataset;
* checkpoint (a run or step directory): the manifest, and every file its metadata names, whole.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from rhocli.core.errors import BadInputError, MissingInputError


@dataclasses.dataclass
class Verified:
    path: str
    kind: str
    #: what was checked and found right, in order
    passed: list[str]
    #: the first problem (None: the path is sound)
    problem: str | None = None


def verify_path(path: str) -> Verified:
    """Check ``path`` (a store prefix or a checkpoint directory); problems are reported, not raised."""
    p = Path(path)
    result = Verified(path, "unknown", [])
    try:
        if Path(path + ".json").is_file() or Path(path + ".idx").is_file():  # a store, even beside a folder of its name
            _store(path, result)
        elif p.is_dir():
            _checkpoint(p, result)
        else:
            raise MissingInputError(f"{path}: neither a store (PREFIX.idx/.bin/.json) nor a checkpoint directory")
    except (BadInputError, MissingInputError) as err:
        result.problem = str(err)
    return result


def _checkpoint(p: Path, result: Verified) -> None:
    from rhocli.core.formats import checkpoint as ckpt

    result.kind = "checkpoint"
    step_dir = ckpt.resolve_checkpoint(p)
    files = ckpt.check_checkpoint_files(step_dir)
    result.passed.append(f"{step_dir.name}: manifest, metadata and {files} data file(s) whole")


def _store(prefix: str, result: Verified) -> None:
    import json

    from rhocli.core.formats.indexed import check_counts, read_index
    from rhocli.core.formats.manifest import check_fingerprint

    manifest_file = Path(prefix + ".json")
    fmt = None
    if manifest_file.is_file():
        try:
            fmt = json.loads(manifest_file.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            raise BadInputError(f"{manifest_file}: not a readable manifest") from None
    if fmt in (None, "rho.tokens"):
        from rhocli.core.formats.tokens import TokenDataset

        result.kind = "token dataset" if fmt else "token dataset (no manifest)"
        ds = TokenDataset(prefix)  # structure and counts
        result.passed.append(f"structure: {ds.num_documents:,} documents, {ds.num_tokens:,} tokens")
        if ds.manifest:
            check_fingerprint(prefix, ds.manifest)
            result.passed.append("content fingerprint")
            vocab = (ds.manifest.get("tokenizer") or {}).get("vocab_size")
            if vocab:
                top = int(np.fromfile(prefix + ".bin", dtype=ds.dtype).max(initial=0))
                if top >= vocab:
                    raise BadInputError(f"{prefix}.bin: token id {top} is outside the tokenizer's vocabulary ({vocab})")
                result.passed.append(f"ids below the vocabulary ({vocab:,})")
        return
    if fmt == "rho.scores":
        from rhocli.core.formats.scores import open_scores

        result.kind = "score store"
        store = open_scores(prefix)  # structure, counts, every value finite
        result.passed.append(f"structure: {store.lengths.size:,} documents, {store.values.size:,} finite scores")
        check_fingerprint(prefix, store.manifest)
        result.passed.append("content fingerprint")
        _token_dataset(store.manifest, result)
        return
    if fmt == "rho.sample_scores":
        from rhocli.core.formats.sample_scores import verify_sample_store

        result.kind = "sample score store"
        manifest, n = verify_sample_store(prefix)  # size, every value finite, content fingerprint
        result.passed.append(f"structure: {manifest['samples']:,} samples x {manifest['seq_length']} positions, "
                             f"{n:,} finite scores")
        result.passed.append("content fingerprint")
        from rhocli.core.formats.manifest import store_fingerprint

        for named in manifest.get("datasets") or []:  # the token datasets its pipeline reads, when present
            if Path(named["prefix"] + ".bin").is_file():
                if store_fingerprint(named["prefix"]) != named["fingerprint"]:
                    raise BadInputError(f"{prefix}: made for token dataset {named['prefix']} with fingerprint "
                                        f"{named['fingerprint'][:19]}…, which has other content now")
                result.passed.append(f"token dataset {named['prefix']} is the one scored")
        return
    if fmt == "rho.mask":
        from rhocli.core.formats.masks import read_mask_manifest

        result.kind = "mask store"
        manifest = read_mask_manifest(prefix)
        info = read_index(prefix)
        values = np.fromfile(prefix + ".bin", dtype=info.dtype)
        if values.size and values.max() > 1:
            raise BadInputError(f"{prefix}.bin: holds the value {int(values.max())}; a mask holds 0 and 1 only")
        check_counts(info, {"tokens": manifest.get("tokens")}, prefix)
        result.passed.append(f"structure: {info.documents:,} documents, {int(values.sum()):,} of {values.size:,} kept")
        check_fingerprint(prefix, manifest)
        result.passed.append("content fingerprint")
        _token_dataset(manifest, result)
        return
    raise BadInputError(f"{manifest_file}: format {fmt!r} is not a rho store")


def _token_dataset(manifest: dict, result: Verified) -> None:
    """The token dataset a score or mask store names, when it is there, is the one it was made for."""
    from rhocli.core.formats.manifest import store_fingerprint

    named = manifest.get("token_dataset") or {}
    prefix = named.get("prefix")
    if not prefix or not Path(str(prefix) + ".bin").is_file():
        result.passed.append("its token dataset: not at hand (not checked)")
        return
    if store_fingerprint(prefix) != named.get("fingerprint"):
        raise BadInputError(f"{prefix}: the token dataset at this path is not the one the store was made for "
                            "(its fingerprint differs)")
    result.passed.append(f"its token dataset {prefix}: the one it was made for")
