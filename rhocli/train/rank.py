"""One rank of ``rho train`` (started through ``rhocli.core.launch``): the engine's ``Trainer`` with
the run directory's checkpoint store and (on rank 0) its metrics sinks (``sinks.run_metrics``)."""

from __future__ import annotations

from typing import Any


def run_train_rank(spec_dict: dict[str, Any], on_event=None) -> dict[str, Any] | None:
    from rhocli.core.megatron_io import import_megatron

    import_megatron()  # before the engine: quietly, torch.compile deferred
    from parallel.distributed import destroy_distributed, init_distributed
    from parallel.errors import PreemptedError
    from parallel.trainer import Trainer
    from rhocli.core.formats.checkpoint import CheckpointStore
    from rhocli.core.processes import die_with_parent
    from rhocli.train.sinks import run_metrics
    from rhocli.train.spec import spec_from_dict
    from rhocli.train.step_gate import rank_gate

    spec = spec_from_dict(spec_dict)
    try:
        layout = init_distributed(spec.train.tp, spec.train.pp, spec.train.seed, virtual_pp=spec.train.virtual_pp,
                                  cp=spec.train.cp)
        store = CheckpointStore(spec.run_dir)
        # metrics.jsonl, TensorBoard, W&B: rank 0 only; a W&B run is continued when the Trainer will resume
        metrics = (run_metrics(spec, layout.world_size, resuming=bool(spec.train.resume) and store.latest() is not None)
                   if layout.rank == 0 else None)
        if layout.rank == 0:  # ``rho bench train`` alternating two runs step by step (step_gate.py)
            gate = rank_gate(min(spec.train.steps, spec.train.stop_after or spec.train.steps))
            on_event = gate.wrap(on_event) if gate is not None else on_event
        failed = True
        try:
            # processes the engine starts (an async save's writer) die with this rank
            init_tensors = None
            if spec.init_format == "huggingface":  # each rank reads its own shards of the HF weights
                from rhocli.core.formats.hf import HFReader

                init_tensors = HFReader(spec.init_checkpoint).get
            reference_tensors = None
            if spec.reference is not None and spec.reference.format == "huggingface":
                from rhocli.core.formats.hf import HFReader

                reference_tensors = HFReader(spec.reference.path).get
            trace = None
            if spec.train.trace_selection:
                from rhocli.core.formats.selection_trace import TraceWriter

                trace = TraceWriter(spec.run_dir)
            summary = Trainer(spec, layout, store, metrics, on_event, child_setup=die_with_parent,
                              init_tensors=init_tensors, reference_tensors=reference_tensors,
                              sample_values=_sample_values, trace=trace).run()
            failed = False
            return summary
        except PreemptedError as err:
            err.args = (f"{err}; continue with: rho train ... --resume",)
            raise
        finally:
            if metrics is not None:  # flushed and finished however the run ended (wandb: failed or not)
                try:
                    metrics.close(failed)
                except Exception:
                    if not failed:  # after a failure, the run's own error is the one to report
                        raise
    finally:
        destroy_distributed()


def _sample_values(prefix: str):
    """A sample score store's values [samples, seq_length], memory-mapped (read as the run goes)."""
    from rhocli.core.formats.sample_scores import open_sample_scores

    return open_sample_scores(prefix, label="--scores ").values
