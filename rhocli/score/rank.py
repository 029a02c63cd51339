"""One rank of ``rho score`` (started through ``rhocli.core.launch``): the engine's ``Scorer`` with the
store writer as its sink and the weights ``--model`` names.

megatron-core is imported through ``core.megatron_io.import_megatron`` (``torch.compile`` deferred).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def import_engine() -> None:
    """Import the scoring engine after megatron-core (``core.megatron_io.import_megatron``: quietly,
    ``torch.compile`` deferred)."""
    from rhocli.core.megatron_io import import_megatron

    import_megatron()
    import parallel.scorer  # noqa: F401
    import parallel.distributed  # noqa: F401


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
                                   tp, tp_rank, source=f"--model {path}")
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
        entropy_sink = None
        if spec.entropy:
            from rhocli.core.formats.scores import ENTROPY_VALUE, entropy_prefix

            entropy_sink = ScoreStoreWriter(entropy_prefix(job.output), {**job.manifest_fields, "value": ENTROPY_VALUE,
                                                                          "losses": job.output}, job.settings)
        load = weight_loader(job.model_format, job.model_path, spec.model, spec.tp, spec.pp)
        return Scorer(spec, layout, sink, load, on_event, entropy_sink=entropy_sink).run()
    finally:
        destroy_distributed()
