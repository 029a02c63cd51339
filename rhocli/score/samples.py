"""``rho score --for-run CONFIG``: the reference losses of a training run's own samples (a sample store).

The run's configuration (the ``rho train`` YAML, ``--data``, ``--set``) fixes its samples: megatron's
GPTDataset over the same blend, split, sequence length, seed and number of samples, packed as the run
packs them. Each rank reads the run's micro-batches exactly as ``rho train`` does
(``parallel.data.MicroBatches``, the run's micro-batch size by default) and the reference model scores
them through the same code as ``rho train --reference`` (``parallel.reference``), so a run that reads
the store selects on the values it would have computed online, bit for bit at the same layout. The
rows go into a ``formats.sample_scores`` store, each DP rank's progress recorded per step (``--resume``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from rhocli.core.errors import MismatchError, OutputExistsError, UsageError
from rhocli.core.model_source import resolve_model

#: how a resume's refusal names each setting
RESUME_NAMES = {"reference_model": "--model (its fingerprint)", "pipeline": "the run's data pipeline (--for-run, --data, --set)",
                "micro_batch_size": "--micro-batch-size", "tp": "--tp", "pp": "--pp", "dp": "--dp",
                "sequence_parallel": "--sequence-parallel"}


@dataclasses.dataclass
class SampleScoreJob:
    """Everything a rank needs (a plain dict crosses into spawned workers: ``to_dict``/``from_dict``)."""

    reference: dict[str, Any]  # parallel.reference.ReferenceSpec as a dict
    vocab_size: int
    data: dict[str, Any]  # parallel.data.DataSpec's fields (no stores)
    samples: int
    valid_samples: int
    global_batch_size: int
    micro_batch_size: int
    tp: int
    pp: int
    sequence_parallel: bool
    entropy: bool
    output: str
    manifest_fields: dict[str, Any]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleScoreJob":
        return cls(**d)


def build_sample_score_job(model: str, train_cfg, refs, tokenizer_fp: str | None, data_vocab: int | None, eod: int,
                           pipeline: dict[str, Any],
                           output: str, tp: int, pp: int, dp: int | None, micro_batch_size: int | None, resume: bool,
                           force: bool, world_size: int | None = None, sequence_parallel: bool = False,
                           entropy: bool = False, config_name: str = "--for-run"):
    """Validate; returns (SampleScoreJob, world size). ``train_cfg``, ``refs``, ``pipeline``: the run's
    (``rhocli.train.spec``: its configuration, its --data datasets, ``run_pipeline``)."""
    from rhocli.score.rank import import_engine

    import_engine()
    import torch

    from parallel.config import ModelConfig
    from parallel.hf import model_config_from_hf
    from parallel.layout import check_sequence_parallel, data_parallel_size, micro_batches_per_step, padded_vocab_size
    from parallel.model import transformer_config
    from rhocli.core.formats.sample_scores import SampleScoreWriter
    from rhocli.core.formats.scores import entropy_prefix

    source = resolve_model(model, "--model", model_config_from_hf)
    manifest = source.manifest
    model_cfg = ModelConfig(**manifest["model"])
    vocab = int(manifest["vocab_size"])
    if manifest.get("tokenizer_fingerprint") and tokenizer_fp and manifest["tokenizer_fingerprint"] != tokenizer_fp:
        raise MismatchError(f"--data {refs[0].prefix}: tokenized with another tokenizer than the model {source.path} was trained on")
    if data_vocab and int(data_vocab) > vocab:
        raise MismatchError(f"--data {refs[0].prefix}: vocabulary {data_vocab} does not fit the model's {vocab}")
    if train_cfg.seq_length > model_cfg.max_position_embeddings:
        raise MismatchError(f"--model {model}: max_position_embeddings {model_cfg.max_position_embeddings} is below the "
                            f"run's seq_length {train_cfg.seq_length}")
    if train_cfg.cp > 1:
        raise UsageError(f"{config_name}: the run's --cp {train_cfg.cp}: score its samples at --cp 1 (the values do not "
                         "depend on how a sequence is split)")
    mbs = micro_batch_size or train_cfg.micro_batch_size
    if mbs < 1:
        raise UsageError("--micro-batch-size must be >= 1")
    if world_size is None:
        world_size = tp * pp * (dp or 1)
    dp = data_parallel_size(world_size, tp, pp, dp)
    micro_batches_per_step(train_cfg.global_batch_size, mbs, dp)  # the run's batch splits over this layout
    check_sequence_parallel(sequence_parallel, tp, train_cfg.seq_length)
    transformer_config(model_cfg, tp, pp, torch.float32, **({"sequence_parallel": True} if sequence_parallel else {}))
    padded_vocab_size(vocab, tp, model_cfg.make_vocab_size_divisible_by)

    reference_model = source.description()
    settings = {"reference_model": reference_model["fingerprint"], "pipeline": pipeline, "micro_batch_size": mbs,
                "tp": tp, "pp": pp, "dp": dp, "sequence_parallel": sequence_parallel}
    outputs = [output] + ([entropy_prefix(output)] if entropy else [])
    for prefix in outputs:
        writer = SampleScoreWriter(prefix, settings=settings)
        if any(p.exists() for p in writer.final_paths) and not force:
            raise OutputExistsError(f"{prefix}.json: score store already exists; pass --force to replace it")
        if writer.work.exists() and not resume and not force:
            raise OutputExistsError(f"{writer.work}: an unfinished scoring run is there; pass --resume to continue it or "
                                    "--force to start over")
        if writer.work.exists() and resume:
            writer.check_resume(RESUME_NAMES)
    out = Path(output)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    data = {"prefixes": [r.prefix for r in refs], "weights": [r.weight for r in refs] if refs[0].weight is not None else None,
            "seq_length": train_cfg.seq_length, "seed": train_cfg.seed, "split": train_cfg.split,
            "eval_prefixes": list(train_cfg.eval_data), "eod": int(eod), "vocab_size": vocab,
            "separate_documents": train_cfg.separate_documents, "whole_documents": train_cfg.pack == "whole"}
    fields = {"pipeline": pipeline, "reference_model": reference_model, "tokenizer_fingerprint": tokenizer_fp,
              "datasets": [{"prefix": r.prefix, "weight": r.weight, "fingerprint": r.fingerprint} for r in refs],
              "computed_with": {"tp": tp, "pp": pp, "dp": dp, "micro_batch_size": mbs,
                                "sequence_parallel": sequence_parallel}}
    valid_samples = train_cfg.eval_iters * train_cfg.global_batch_size if train_cfg.eval_iters > 0 else 0
    reference = {"model": dataclasses.asdict(model_cfg), "format": source.format, "path": str(source.path),
                 "fingerprint": reference_model["fingerprint"]}
    job = SampleScoreJob(reference=reference, vocab_size=vocab, data=data, samples=pipeline["samples"],
                         valid_samples=valid_samples, global_batch_size=train_cfg.global_batch_size,
                         micro_batch_size=mbs, tp=tp, pp=pp, sequence_parallel=sequence_parallel, entropy=entropy,
                         output=str(output), manifest_fields=fields, settings=settings)
    return job, world_size


def _writers(job: SampleScoreJob):
    from rhocli.core.formats.sample_scores import ENTROPY_VALUE, LOSS_VALUE, SampleScoreWriter
    from rhocli.core.formats.scores import entropy_prefix

    fields = job.manifest_fields
    writers = {"ref_loss": SampleScoreWriter(job.output, fields, job.settings, LOSS_VALUE)}
    if job.entropy:
        writers["ref_entropy"] = SampleScoreWriter(entropy_prefix(job.output), {**fields, "losses": job.output},
                                                   job.settings, ENTROPY_VALUE)
    return writers


def run_sample_score_rank(job_dict: dict[str, Any], on_event=None) -> dict[str, Any]:
    """One rank: the run's datasets, the reference model on this layout, this DP rank's micro-batches."""
    from rhocli.score.rank import import_engine

    import_engine()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from parallel.config import ModelConfig
    from parallel.data import DataSpec, MicroBatches, TokenIds, build_datasets
    from parallel.distributed import destroy_distributed, init_distributed
    from parallel.layout import micro_batches_per_step
    from parallel.reference import ReferenceModel, ReferenceSpec, load_reference_weights, score_samples

    job = SampleScoreJob.from_dict(job_dict)
    on_event = on_event or (lambda kind, payload: None)
    try:
        layout = init_distributed(job.tp, job.pp, seed=0)
        ref = ReferenceSpec(**{**job.reference, "model": ModelConfig(**job.reference["model"])})
        tensors = None
        if ref.format == "huggingface":
            from rhocli.core.formats.hf import HFReader

            tensors = HFReader(ref.path).get
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        features = {"sequence_parallel": True} if job.sequence_parallel else {}
        reference = ReferenceModel(ref, job.vocab_size, job.tp, job.pp, 1, features, dtype,
                                   lambda chunks, shape: load_reference_weights(chunks, shape, ref, job.tp, tensors),
                                   entropy=job.entropy)
        writers = _writers(job)
        seq = job.data["seq_length"]
        if layout.rank == 0:
            for w in writers.values():
                w.prepare(job.samples, seq)
        dist.barrier()
        d = job.data
        spec = DataSpec(prefixes=tuple(d["prefixes"]), weights=tuple(d["weights"]) if d["weights"] else None,
                        seq_length=seq, seed=d["seed"], split=d["split"],
                        token_ids=TokenIds(vocab_size=d["vocab_size"], eod=d["eod"]),
                        cache_dir=str(writers["ref_loss"].work / "data_cache"),
                        eval_prefixes=tuple(d["eval_prefixes"]), separate_documents=d["separate_documents"],
                        whole_documents=d["whole_documents"])
        train_ds, _ = build_datasets(spec, job.samples, job.valid_samples)
        steps = job.samples // job.global_batch_size
        per_step = micro_batches_per_step(job.global_batch_size, job.micro_batch_size, layout.dp)
        first = min(w.first_step(layout.dp) for w in writers.values())
        dp_rank = ps.get_data_parallel_rank()
        is_writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        micro_batches = MicroBatches(train_ds, first * job.global_batch_size, job.micro_batch_size, dp_rank, layout.dp)
        on_event("start", {"samples": job.samples, "steps": steps, "resumed_steps": first,
                           "tokens": job.samples * seq, "seq_length": seq})
        t0 = time.perf_counter()

        def write(step: int, samples: list[int], values: dict[str, Any]) -> None:
            for key, writer in writers.items():
                writer.write(samples, values[key], (job.samples, seq))

        def on_step(step: int) -> None:
            if is_writer:
                for writer in writers.values():
                    writer.step_done(step, dp_rank)
            done = (step + 1 - first) * job.global_batch_size * seq
            on_event("progress", {"step": step, "steps_total": steps, "tokens": done,
                                  "elapsed_s": time.perf_counter() - t0})

        score_samples(reference, micro_batches, first, steps, per_step, seq, job.micro_batch_size,
                      write if is_writer else None, on_step)
        dist.barrier()
        result: dict[str, Any] = {}
        if layout.rank == 0:
            if "ref_entropy" in writers:
                result["entropy"] = writers["ref_entropy"].publish()
            result = {**writers["ref_loss"].publish(), **result}
        dist.barrier()
        on_event("done", result)
        return result
    finally:
        destroy_distributed()


def run_sample_scoring(job: SampleScoreJob, world: int, force: bool, resume: bool, renderer_cls: type | None) -> None:
    """Under torchrun every rank calls this; rank 0 holds the store's lock."""
    import contextlib

    from rhocli.core.launch import run_ranks
    from rhocli.core.lock import OutputLock

    rank0 = int(os.environ.get("RANK", 0)) == 0
    lock = OutputLock(job.output + ".rho-lock", f"--output {job.output}") if rank0 else contextlib.nullcontext()
    with lock:
        if force and not resume and rank0:
            for writer in _writers(job).values():
                writer.clear_work()
        run_ranks(world, run_sample_score_rank, job.to_dict(), renderer_cls)
