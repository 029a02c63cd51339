"""One rank of ``rho score`` (started through ``rhocli.core.launch``): the engine's ``Scorer`` with the
store writer as its sink and the weights ``--model`` names.

megatron-core is imported with ``torch.compile`` deferred (``lazy_torch_compile``): 1.3 s less
start-up for a process that never compiles anything.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def lazy_torch_compile():
    """Import megatron-core with ``torch.compile`` deferred to each decorated function's first call.

    megatron-core decorates its fusion helpers with ``torch.compile`` at import time, which imports
    TorchInductor: 1.3 s of the 2 s megatron import on the 2-core VM. rho's model uses none of
    them (bias/activation, RoPE and softmax fusions are off), so a scoring process never pays for
    the compiler; a helper that is called is compiled on that call, exactly as it would have been.
    """
    import torch

    real = torch.compile

    def lazy(model=None, **kwargs):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: lazy(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **kwargs)
            return compiled(*args, **kw)

        return call

    torch.compile = lazy
    try:
        yield
    finally:
        torch.compile = real


def import_engine() -> None:
    """Import the scoring engine (megatron-core) quickly: see ``lazy_torch_compile``."""
    with lazy_torch_compile():
        import parallel.scorer  # noqa: F401
        import parallel.distributed  # noqa: F401
        import megatron.core.pipeline_parallel  # noqa: F401


def weight_loader(model_format: str, path: str, model_cfg, tp: int, pp: int):
    """``load_weights(model, shape, tp_rank, pp_rank)`` for the engine: a rho checkpoint's tensors
    through dist_checkpointing, or this rank's slices of a HF model's tensors."""
    if model_format == "huggingface":
        from parallel.hf import load_hf_into_model
        from rhocli.core.errors import BadInputError
        from rhocli.core.formats.hf import HFReader

        def load(model, shape, tp_rank: int, pp_rank: int) -> None:
            try:
                load_hf_into_model(model, HFReader(path).get, model_cfg, shape.padded_vocab_size, shape.params_dtype,
                                   tp, tp_rank, pp, pp_rank, source=f"--model {path}")
            except BadInputError as err:
                raise BadInputError(f"--model {err}") from None

        return load

    from parallel.checkpoint import load_checkpoint

    return lambda model, shape, tp_rank, pp_rank: load_checkpoint(Path(path), [model])


def run_score_rank(job_dict: dict[str, Any], on_event=None) -> dict[str, Any]:
    import_engine()
    from parallel.distributed import destroy_distributed, init_distributed
    from parallel.scorer import Scorer
    from rhocli.core.formats.scores import ScoreStoreWriter
    from rhocli.score.job import ScoreJob

    job = ScoreJob.from_dict(job_dict)
    spec = job.engine
    try:
        layout = init_distributed(spec.tp, spec.pp, seed=0)
        sink = ScoreStoreWriter(job.output, job.manifest_fields, job.settings)
        load = weight_loader(job.model_format, job.model_path, spec.model, spec.tp, spec.pp)
        return Scorer(spec, layout, sink, load, on_event).run()
    finally:
        destroy_distributed()
