"""The training loop over megatron-core: one process per rank, any TP x PP x DP layout.

``run_training`` builds this rank's pipeline stage of the model, wraps it in megatron's
DistributedDataParallel, builds megatron's optimizer and LR scheduler, feeds GPTDataset micro-batches
through ``get_forward_backward_func()`` (1F1B under PP), and checkpoints with dist_checkpointing.

The loss follows megatron's ``(loss_sum, num_tokens)`` convention (``calculate_per_token_loss``): each
micro-batch returns the *sum* of its token losses and its token count, the schedule adds counts over
micro-batches and ``finalize_model_grads`` divides the gradients by the global count after the DP
all-reduce, so normalisation is exact whatever the split into micro-batches and DP ranks. Plain and
selective training share that path (``parallel.loss``): only the kept tokens differ.

Library code: it raises ``parallel.errors`` types, reports progress through ``on_event`` (structured
payloads; the caller renders them), writes metrics through ``metrics`` and checkpoints through
``checkpoints`` (sinks the caller owns); it never prints and never decides a file layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from parallel.context_parallel import split_for_context_parallel
from parallel.checkpoint import AsyncSaves, CheckpointSink, load_checkpoint, save_checkpoint
from parallel.config import ModelConfig, TrainConfig
from parallel.data import DataSpec, MicroBatches, build_datasets
from parallel.distributed import Layout
from parallel.errors import NonFiniteValueError, PreemptedError
from parallel.layout import micro_batches_per_step
from parallel.loss import Selection
from parallel.score_functions import parse_score, score_inputs
from parallel.model import build_model_chunks, count_parameters, layer_backend, model_features, model_shape
from parallel.reference import ReferenceModel, ReferenceSpec, load_reference_weights, reference_features

Event = Callable[[str, dict[str, Any]], None]


class MetricsSink(Protocol):
    def append(self, record: dict[str, Any]) -> None: ...
    def truncate_after(self, step: int) -> None: ...


class CheckpointStore(CheckpointSink, Protocol):
    def latest(self) -> tuple[Path, dict[str, Any]] | None: ...
    def clean_stale_temporaries(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    prefix: str
    weight: float | None
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a rank needs, validated by the CLI before workers start."""

    model: ModelConfig
    train: TrainConfig
    vocab_size: int
    eod_id: int
    tokenizer_fingerprint: str | None
    datasets: tuple[DatasetRef, ...]
    run_dir: str
    config_snapshot: dict[str, Any]
    #: score stores aligned with ``datasets`` (selective training), or empty
    scores: tuple[DatasetRef, ...] = ()
    #: the reference entropy beside each score store (``--select-by entropy``), or empty
    entropies: tuple[DatasetRef, ...] = ()
    #: static mask stores aligned with ``datasets`` (rho select), or empty
    masks: tuple[DatasetRef, ...] = ()
    #: validation datasets of their own (``TrainConfig.eval_data``), or empty: the split of ``datasets``
    eval_datasets: tuple[DatasetRef, ...] = ()
    #: static masks of ``eval_datasets`` (``TrainConfig.eval_masks``), same order; empty: every token
    eval_masks: tuple[DatasetRef, ...] = ()
    #: the step directory ``TrainConfig.init`` names (weights only), resolved by the caller; or a
    #: Hugging Face model directory when ``init_format`` is "huggingface"
    init_checkpoint: str | None = None
    init_format: str = "rho"
    #: the tokenizer's begin-of-sequence id (recorded in checkpoints, for export), if it has one
    bos_id: int | None = None
    #: the reference model run online on each step's micro-batches (``TrainConfig.reference``), or None
    reference: ReferenceSpec | None = None
    #: a sample score store (reference losses of this run's own samples) in place of ``scores``, and
    #: its entropy store (``--select-by entropy``), or None
    sample_scores: DatasetRef | None = None
    sample_entropies: DatasetRef | None = None

    @property
    def reference_source(self) -> str | None:
        """Where the selection's reference losses come from: "online", "samples", "documents", or None."""
        if self.reference is not None:
            return "online"
        if self.sample_scores is not None:
            return "samples"
        return "documents" if self.scores else None

    def config_hash(self) -> str:
        text = json.dumps(self.config_snapshot, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def wsd_decay_steps(cfg: TrainConfig) -> int:
    """The decay phase of a wsd schedule: the configured steps, or a tenth of the run."""
    return cfg.wsd_decay_steps if cfg.wsd_decay_steps is not None else max(1, cfg.steps // 10)


def data_parallel_features(cfg: TrainConfig, dp: int, on_gpu: bool) -> dict[str, bool]:
    """megatron-core DDP options for a run: the distributed optimizer and the overlap of gradient
    reduction / parameter gathering with compute, each as asked, or by default on with DP > 1 on a GPU
    (where the communication is worth hiding; on CPU gloo runs them in the compute's place)."""
    default = on_gpu and dp > 1
    dist_opt = default if cfg.distributed_optimizer is None else cfg.distributed_optimizer
    overlap_grad = default if cfg.overlap_grad_reduce is None else cfg.overlap_grad_reduce
    overlap_param = (dist_opt and overlap_grad) if cfg.overlap_param_gather is None else cfg.overlap_param_gather
    return {"use_distributed_optimizer": dist_opt, "overlap_grad_reduce": overlap_grad,
            "overlap_param_gather": overlap_param}


def _weights(refs) -> tuple[float, ...] | None:
    weights = [d.weight for d in refs]
    return tuple(weights) if len(weights) > 1 and all(w is not None for w in weights) else None


def _params_dtype(precision: str) -> torch.dtype:
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_available()):
        return torch.bfloat16
    return torch.float16 if precision == "fp16" else torch.float32


def make_forward_step(selection, trace: bool = False):
    """megatron's forward_step_func for a selection policy (plain LM: ``Selection()``); ``trace``:
    each micro-batch's report also holds what was selected (``parallel.loss.TRACE_FIELDS``)."""
    from parallel.loss import make_loss_func, token_losses

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        # context parallelism: this rank's two chunks of every sequence (megatron's load-balanced split)
        batch = split_for_context_parallel(batch)
        output = token_losses(model, batch)
        return output, make_loss_func(selection, batch, trace)

    return forward_step


class _SigtermFlag:
    def __init__(self) -> None:
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """One rank of a training run. ``checkpoints`` is where every rank saves and resumes from;
    ``metrics`` (rank 0's; None elsewhere) receives one record per logged step; ``on_event`` (rank 0's
    renderer, or None) receives ``start``/``resumed``/``initialized``/``eval``/``step``/``checkpoint``/
    ``done`` with structured payloads. ``child_setup`` runs first in every process the engine starts
    itself (an asynchronous save's writer and its results server). ``init_tensors(name)`` reads one
    tensor of the Hugging Face model a run starts from (``init_format`` "huggingface"): each rank
    reads only its shards; ``reference_tensors(name)`` the same for a Hugging Face reference model
    (``spec.reference``). ``sample_values(prefix)`` opens a sample score store's values [samples,
    seq_length] (``spec.sample_scores``). ``trace(step, dp_rank, record)`` receives, for the first
    ``TrainConfig.trace_selection`` steps, each DP rank's traced micro-batches (numpy arrays of
    ``parallel.loss.TRACE_FIELDS``, concatenated over the step's micro-batches)."""

    def __init__(self, spec: RunSpec, layout: Layout, checkpoints: CheckpointStore, metrics: MetricsSink | None = None,
                 on_event: Event | None = None, child_setup: Callable[[], None] | None = None,
                 init_tensors: Callable[[str], torch.Tensor] | None = None,
                 reference_tensors: Callable[[str], torch.Tensor] | None = None,
                 sample_values: Callable[[str], Any] | None = None,
                 trace: Callable[[int, int, dict[str, Any]], None] | None = None):
        from megatron.core import parallel_state as ps

        self.spec = spec
        self.cfg = spec.train
        self.layout = layout
        # the layers' backend: Transformer Engine on a GPU that has it, else the local spec, which
        # packed documents kept apart need (rho's SDPA takes megatron's explicit attention mask)
        self.backend = layer_backend(local=spec.train.separate_documents)
        self.checkpoints = checkpoints
        self.init_tensors = init_tensors
        self.reference_tensors = reference_tensors
        self.sample_values = sample_values
        self.trace = trace
        self.metrics = metrics
        self.on_event = on_event or (lambda kind, payload: None)
        self.run_dir = Path(spec.run_dir)
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.dp_rank = ps.get_data_parallel_rank()
        self.params_dtype = _params_dtype(self.cfg.precision)
        self.shape = model_shape(spec.model, spec.vocab_size, layout.tp, self.params_dtype)
        self.num_microbatches = micro_batches_per_step(self.cfg.global_batch_size, self.cfg.micro_batch_size, layout.dp)
        self.vp = self.cfg.virtual_pp or 1
        self.selection = Selection(ratio=self.cfg.select_ratio, scope=self.cfg.select_scope, score=self.cfg.select_by,
                                   ratio_start=self.cfg.select_ratio_start, select_after=self.cfg.select_after,
                                   steps=self.cfg.steps)
        self._build_model_and_optimizer()
        # built after the trained model, so that its initialisation is a plain run's
        self.reference = self._build_reference() if spec.reference is not None else None
        # checkpoints written in the background (None: each save completes before training goes on)
        self.async_saves = AsyncSaves(child_setup) if self.cfg.async_save and self.cfg.checkpoint else None
        self.step = 0
        self.consumed_samples = 0

    # ------------------------------------------------------------------ setup
    def _build_model_and_optimizer(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        # DDP reduces gradients over the DP x CP ranks
        parallel_features = data_parallel_features(cfg, self.layout.dp * self.layout.cp, torch.cuda.is_available())
        use_dist_opt = parallel_features["use_distributed_optimizer"]
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, **parallel_features)
        # one model chunk per virtual pipeline stage (interleaved 1F1B), else one
        self.model_chunks = []
        # restore() overwrites every weight when it resumes from a checkpoint or starts from --init:
        # then none is initialised (a 7B model's random init is minutes on a CPU, wasted)
        weights_loaded = (self.checkpoints.latest() is not None) if cfg.resume else bool(self.spec.init_checkpoint)
        for vp_stage, module in enumerate(build_model_chunks(self.spec.model, self.shape, self.layout.tp,
                                                             self.layout.pp, self.vp, model_features(cfg),
                                                             weights_loaded=weights_loaded, backend=self.backend)):
            if torch.cuda.is_available():
                module.cuda(torch.cuda.current_device())
            # as Megatron-LM: only the first chunk's gradients are bucketed (the others' reductions
            # are started by the schedule once their backward is done)
            self.model_chunks.append(DistributedDataParallel(config=module.config, ddp_config=ddp_config,
                                                             module=module, disable_bucketing=vp_stage > 0))
        bf16, fp16 = self.params_dtype == torch.bfloat16, self.params_dtype == torch.float16
        opt_config = OptimizerConfig(
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            sgd_momentum=0.0,
            clip_grad=cfg.clip_grad,
            bf16=bf16,
            fp16=fp16,
            params_dtype=self.params_dtype,
            use_distributed_optimizer=use_dist_opt,
            # fp16: a fixed loss scale when given, else megatron-core's DynamicGradScaler
            loss_scale=cfg.loss_scale,
            initial_loss_scale=cfg.initial_loss_scale,
            loss_scale_window=cfg.loss_scale_window,
            hysteresis=cfg.loss_scale_hysteresis,
            min_loss_scale=1.0,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.model_chunks)
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            # megatron sets no state initialiser for SGD (it has no state with momentum 0), but
            # sharded_state_dict(is_loading=True) calls it unconditionally.
            if getattr(opt, "init_state_fn", "absent") is None:
                opt.init_state_fn = lambda optimizer, config: None
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.warmup_steps,
            lr_decay_steps=max(cfg.steps, 1),
            lr_decay_style="WSD" if cfg.lr_decay_style == "wsd" else cfg.lr_decay_style,
            wsd_decay_steps=wsd_decay_steps(cfg) if cfg.lr_decay_style == "wsd" else None,
            lr_wsd_decay_style=cfg.lr_wsd_decay_style,
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=max(cfg.steps, 1),
            wd_incr_style="constant",
        )
        # the schedule's hooks into DDP, wired as Megatron-LM's train loop wires them
        config = self.model_chunks[0].module.config
        one = (lambda fns: fns[0] if len(fns) == 1 else fns)
        if parallel_features["overlap_grad_reduce"]:
            # reduce only after the last micro-batch's backward, bucket by bucket as it finishes
            config.no_sync_func = one([m.no_sync for m in self.model_chunks])
            config.grad_sync_func = one([m.start_grad_sync for m in self.model_chunks])
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        self.use_dist_opt = use_dist_opt
        # with the parameter all-gather overlapped, DDP gathers the updated weights in forward
        # pre-hooks: checkpoints and evaluation first gather them synchronously
        self.param_gather_hooks = parallel_features["overlap_param_gather"] and use_dist_opt

    def _build_reference(self) -> ReferenceModel:
        """The frozen reference model on this run's layout (``parallel.reference``)."""
        ref = self.spec.reference
        load = lambda chunks, shape: load_reference_weights(chunks, shape, ref, self.layout.tp,  # noqa: E731
                                                            tensors=self.reference_tensors)
        entropy = "ref_entropy" in score_inputs(self.cfg.select_by)
        return ReferenceModel(ref, self.spec.vocab_size, self.layout.tp, self.layout.pp, self.vp,
                              reference_features(model_features(self.cfg)), self.params_dtype, load,
                              backend=self.backend, entropy=entropy)

    @contextlib.contextmanager
    def _weights_gathered(self):
        """The block sees every rank's updated weights (a save, an evaluation): with the overlapped
        parameter gather, its forward pre-hooks are removed after a synchronous all-gather, and put
        back after (Megatron-LM's disable/enable_forward_pre_hook around eval and checkpoints)."""
        if not self.param_gather_hooks:
            yield
            return
        for chunk in self.model_chunks:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.model_chunks:
                chunk.enable_forward_pre_hook()

    def _build_data(self) -> None:
        cfg = self.cfg
        spec = DataSpec(
            prefixes=tuple(d.prefix for d in self.spec.datasets),
            weights=_weights(self.spec.datasets),
            seq_length=cfg.seq_length,
            seed=cfg.seed,
            split=cfg.split,
            token_ids=_token_ids(self.spec),
            cache_dir=cfg.data_cache or str(self.run_dir / "data_cache"),
            scores=tuple(s.prefix for s in self.spec.scores),
            masks=tuple(m.prefix for m in self.spec.masks),
            entropies=tuple(e.prefix for e in self.spec.entropies),
            eval_prefixes=tuple(d.prefix for d in self.spec.eval_datasets),
            eval_weights=_weights(self.spec.eval_datasets),
            eval_masks=tuple(m.prefix for m in self.spec.eval_masks),
            separate_documents=cfg.separate_documents,
            whole_documents=cfg.pack == "whole",
        )
        valid_samples = cfg.eval_iters * cfg.global_batch_size if cfg.eval_iters > 0 else 0
        self.train_ds, self.valid_ds = build_datasets(spec, cfg.steps * cfg.global_batch_size, valid_samples)
        values, source = {}, ""
        if self.spec.sample_scores is not None:  # reference losses of this run's own samples
            source = self.spec.sample_scores.prefix + ".bin"
            values["ref_loss"] = self.sample_values(self.spec.sample_scores.prefix)
            if self.spec.sample_entropies is not None:
                values["ref_entropy"] = self.sample_values(self.spec.sample_entropies.prefix)
        # with the reference online, one iterator: each step's micro-batches are read once, scored by
        # the reference, then handed to every model chunk (``train_step``)
        self.train_iter = self._iterators(self.train_ds, self.consumed_samples, values, source,
                                          chunks=1 if self.reference is not None else None)

    def _iterators(self, dataset, consumed_samples: int, sample_values: dict | None = None, values_source: str = "",
                   chunks: int | None = None):
        """Micro-batches from ``consumed_samples`` on: one iterator, or under the interleaved schedule
        one per model chunk (each chunk draws its own micro-batches, the same sequence)."""
        # the random control's draws: per sample, from the run's seed (the same on every layout)
        random_seed = self.cfg.seed if self.selection.selective and "random" in score_inputs(self.cfg.select_by) else None
        make = lambda: MicroBatches(dataset, consumed_samples, self.cfg.micro_batch_size, self.dp_rank, self.layout.dp,  # noqa: E731
                                    random_seed=random_seed, sample_values=sample_values, values_source=values_source)
        chunks = self.vp if chunks is None else chunks
        return make() if chunks == 1 else [make() for _ in range(chunks)]

    def _step_data(self):
        """The data iterator(s) of one training step. With the reference online: the step's
        micro-batches, read once, each given the reference's losses for its tokens (this CP rank's
        chunks, passed through the CP split as they are), then one iterator per model chunk."""
        if self.reference is None:
            return self.train_iter
        from parallel.context_parallel import LOCAL_PREFIX

        batches = [next(self.train_iter) for _ in range(self.num_microbatches)]
        values = self.reference.losses(batches, self.cfg.seq_length, self.cfg.micro_batch_size)
        for batch, item in zip(batches, values):  # the last stage's; other stages read no reference values
            batch.update({LOCAL_PREFIX + k: v for k, v in item.items()})
        return iter(batches) if self.vp == 1 else [iter(batches) for _ in range(self.vp)]

    # ------------------------------------------------------------ checkpoints
    def _manifest(self) -> dict[str, Any]:
        return {
            "consumed_samples": self.consumed_samples,
            "scheduler": self.scheduler.state_dict(),
            "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                       **({"cp": self.layout.cp} if self.layout.cp > 1 else {})},
            "vocab_size": self.shape.vocab_size,
            "padded_vocab_size": self.shape.padded_vocab_size,
            "params_dtype": str(self.params_dtype).replace("torch.", ""),
            "tokenizer_fingerprint": self.spec.tokenizer_fingerprint,
            "eod_id": self.spec.eod_id,
            "bos_id": self.spec.bos_id,
            "datasets": [dataclasses.asdict(d) for d in self.spec.datasets],
            "model": dataclasses.asdict(self.spec.model),
            "config": self.spec.config_snapshot,
            "config_hash": self.spec.config_hash(),
            "optimizer": "distributed" if self.use_dist_opt else "fp32",
            "selection": {"ratio": self.selection.ratio, "scope": self.selection.scope, "score": self.selection.score,
                          "thresholds": self._shared_thresholds()},
            "scores": [dataclasses.asdict(s) for s in self.spec.scores],
            "masks": [dataclasses.asdict(m) for m in self.spec.masks],
            **({"sample_scores": dataclasses.asdict(self.spec.sample_scores)} if self.spec.sample_scores else {}),
            **({"reference": {"format": self.spec.reference.format, "path": self.spec.reference.path,
                              "fingerprint": self.spec.reference.fingerprint}} if self.spec.reference else {}),
        }

    def _shared_thresholds(self) -> dict[str, float] | None:
        """The batch-scope thresholds (one per score function), known on the last stage, broadcast
        so rank 0 can save them."""
        if not (self.selection.selective and self.selection.scope == "batch"):
            return None
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        names = parse_score(self.selection.score)[0]
        value = torch.tensor([self.selection.thresholds.get(n, float("nan")) for n in names],
                             dtype=torch.float64, device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        if self.layout.pp > 1:
            dist.broadcast(value, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return {n: float(v) for n, v in zip(names, value.tolist()) if v == v}

    def save(self, wait: bool = False) -> Path:
        """Checkpoint this step. Asynchronous saves: one at a time (the previous one is finished
        first); the step directory exists once ``_finish_saves`` reports it, here with ``wait``."""
        self._finish_saves(blocking=True)
        with self._weights_gathered():
            self._check_finite_params()
            path = save_checkpoint(self.checkpoints, self.step, self.model_chunks, self.optimizer, self._manifest(),
                                   async_saves=self.async_saves)
        if self.async_saves is None:
            self.on_event("checkpoint", {"step": self.step, "path": str(path)})
        elif wait:
            self._finish_saves(blocking=True)
        return path

    def _finish_saves(self, blocking: bool) -> None:
        """Publish the asynchronous saves whose writes are complete on every rank (collective)."""
        if self.async_saves is not None:
            for step, path in self.async_saves.finalize(blocking):
                self.on_event("checkpoint", {"step": step, "path": str(path)})

    def restore(self) -> None:
        """Resume: continue from the latest checkpoint exactly. Init: weights only, step 0."""
        import torch.distributed as dist

        if self.layout.rank == 0:
            self.checkpoints.clean_stale_temporaries()
        dist.barrier()
        if self.cfg.resume:
            latest = self.checkpoints.latest()
            if latest is None:
                return  # nothing saved yet: a fresh start
            step_dir, manifest = latest
            load_checkpoint(step_dir, self.model_chunks, self.optimizer, saved_world_size=manifest.get("world_size"))
            self.step = int(manifest["step"])
            self.consumed_samples = int(manifest["consumed_samples"])
            self.scheduler.load_state_dict(manifest["scheduler"])
            saved = manifest.get("selection") or {}
            self.selection.thresholds = dict(saved.get("thresholds") or {})
            if saved.get("threshold") is not None:  # a checkpoint from before score functions: the excess's
                self.selection.thresholds = {"excess": float(saved["threshold"])}
            if self.metrics is not None:  # drop what a killed run logged after this checkpoint
                self.metrics.truncate_after(self.step)
            self.on_event("resumed", {"step": self.step, "path": str(step_dir)})
        elif self.spec.init_checkpoint and self.spec.init_format == "huggingface":
            from megatron.core import parallel_state as ps

            from parallel.hf import load_hf_into_model

            for chunk in self.model_chunks:  # DDP-wrapped GPTModel chunks: each its own layers
                load_hf_into_model(chunk.module, self.init_tensors, self.spec.model, self.shape.padded_vocab_size,
                                   self.params_dtype, self.layout.tp, ps.get_tensor_model_parallel_rank(),
                                   source=self.spec.init_checkpoint)
            self.optimizer.reload_model_params()  # as below
            self.on_event("initialized", {"path": self.spec.init_checkpoint})
        elif self.spec.init_checkpoint:
            load_checkpoint(Path(self.spec.init_checkpoint), self.model_chunks, optimizer=None)
            # the mixed-precision and distributed optimizers copied the random initial weights into
            # their fp32 main parameters when they were built; without this the first step would
            # copy those back over the loaded weights (Megatron-LM does the same after a load
            # without optimizer state)
            self.optimizer.reload_model_params()
            self.on_event("initialized", {"path": self.spec.init_checkpoint})

    def _check_finite_params(self) -> None:
        for name, param in (item for chunk in self.model_chunks for item in chunk.module.named_parameters()):
            if not torch.isfinite(param).all():
                raise NonFiniteValueError(f"step {self.step}, rank {self.layout.rank}: parameter {name} is not finite; not saving")

    # ------------------------------------------------------------------ steps
    def _reduce_report(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Metrics of the global batch (parallel.loss.summarize), known on every rank."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from parallel.loss import REPORT_FIELDS, summarize

        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        total = torch.zeros(len(REPORT_FIELDS), dtype=torch.float64, device=device)
        if self.is_last_stage:
            for out in outputs:
                total += out["report"].to(device=device, dtype=torch.float64)
            # every DP rank's and, under context parallelism, every chunk's tokens
            dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        if self.layout.pp > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(total, src=last, group=ps.get_pipeline_model_parallel_group())
        return summarize(total.tolist())

    def _forward_backward(self, data_iterator, num_microbatches: int, forward_only: bool, selection=None,
                          trace: bool = False):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=make_forward_step(selection if selection is not None else self.selection, trace),
            data_iterator=data_iterator,
            model=self.model_chunks,
            num_microbatches=num_microbatches,
            seq_length=self.cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size,
            forward_only=forward_only,
        )

    def _optimizer_step(self, loss: float) -> float | None:
        """Megatron's ChainedOptimizer.step, with a finiteness check before any parameter changes.
        None: fp16 gradients overflowed at this loss scale; the scaler lowered it and no parameter
        changed (megatron's skipped step)."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        found_inf = self.optimizer.prepare_grads()  # fp16: unscale, check, update the loss scale
        if found_inf and math.isfinite(loss) and self.params_dtype == torch.float16:
            return None
        grad_norm = float(self.optimizer.get_grad_norm())
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise NonFiniteValueError(
                f"step {self.step + 1}, rank {self.layout.rank}: {what} is not finite "
                f"(loss {loss}, grad norm {grad_norm}); stopped before the optimizer step"
            )
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            params = opt.get_parameters()
            if opt.config.clip_grad > 0.0 and params:
                clip_grad_by_total_norm_fp32(
                    params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False),
                )
        self.optimizer.step_with_ready_grads()
        return grad_norm

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.selection.set_step(self.step)
        select_ratio = self.selection.current_ratio  # this step's (a warm-up or a schedule moves it)
        trace = self.trace is not None and self.step < self.cfg.trace_selection
        outputs = self._forward_backward(self._step_data(), self.num_microbatches, forward_only=False, trace=trace)
        if trace:
            self._write_trace(outputs)
        report = self._reduce_report(outputs)
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = report["tokens"] == 0
        if skipped:
            # no token of the global batch is trained on (a mask or selection kept none): nothing to
            # learn from, so no optimizer step at all (weight decay and momentum would still move the
            # weights); the schedule advances, so the step count and the LR stay in step
            grad_norm = None
            report = {**report, "loss": None}
        else:
            grad_norm = self._optimizer_step(report["loss"])
        overflow = not skipped and grad_norm is None
        self.scheduler.step(increment=1)
        self.selection.end_step(next_step=self.step + 1)
        self.step += 1
        self.consumed_samples += self.cfg.global_batch_size
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {
            "step": self.step,
            **report,
            **({"select_ratio": select_ratio} if select_ratio is not None else {}),
            "lr": lr,
            "grad_norm": grad_norm,
            **({"skipped": "no token kept"} if skipped else {}),
            **({"skipped": "fp16 gradient overflow"} if overflow else {}),
            **({"loss_scale": float(self.optimizer.get_loss_scale())} if self.params_dtype == torch.float16 else {}),
            "step_time_s": dt,
            "peak_memory_bytes": _peak_memory_bytes(),
            "tokens_per_s": self.cfg.global_batch_size * self.cfg.seq_length / dt,
            "consumed_samples": self.consumed_samples,
        }

    def _write_trace(self, outputs: list[dict[str, Any]]) -> None:
        """The step's traced micro-batches, from the last stage's first TP rank of each DP rank."""
        from megatron.core import parallel_state as ps

        if not (self.is_last_stage and ps.get_tensor_model_parallel_rank() == 0 and outputs):
            return
        fields = outputs[0]["trace"].keys()
        record = {k: torch.cat([out["trace"][k] for out in outputs]).numpy() for k in fields}
        self.trace(self.step + 1, self.dp_rank, record)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.cfg.eval_iters <= 0 or self.valid_ds is None or len(self.valid_ds) == 0:
            return None
        for chunk in self.model_chunks:
            chunk.eval()
        gathered = self._weights_gathered()
        gathered.__enter__()
        try:
            # Always the same first eval_iters global batches: curves compare across evaluations.
            data = self._iterators(self.valid_ds, 0)
            total_loss, total_tokens = 0.0, 0.0
            for _ in range(self.cfg.eval_iters):
                # validation loss: every token, whatever the training selection
                outputs = self._forward_backward(data, self.num_microbatches, forward_only=True, selection=Selection())
                report = self._reduce_report(outputs)
                total_loss += report["all_tokens_loss"] * report["tokens"]
                total_tokens += report["tokens"]
        finally:
            gathered.__exit__(None, None, None)
            for chunk in self.model_chunks:
                chunk.train()
        return total_loss / total_tokens if total_tokens else None

    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.append(record)

    def _sigterm_agreed(self, flag: _SigtermFlag) -> bool:
        import torch.distributed as dist

        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        t = torch.tensor([1 if flag.raised else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.restore()
        self._build_data()
        self.on_event("start", self.banner())
        flag = _SigtermFlag()
        last_valid = None
        end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
        if self.step == 0 and cfg.eval_interval > 0:
            # The curve's starting point: validation loss of the initial weights.
            last_valid = self.evaluate()
            self._log({"step": 0, "valid_loss": last_valid})
            self.on_event("eval", {"step": 0, "valid_loss": last_valid})
        try:
            while self.step < end:
                metrics = self.train_step()
                if cfg.eval_interval > 0 and (self.step % cfg.eval_interval == 0 or self.step == cfg.steps):
                    last_valid = self.evaluate()
                    metrics["valid_loss"] = last_valid
                if self.step % cfg.log_interval == 0 or "valid_loss" in metrics or self.step == end:
                    self._log(metrics)
                self.on_event("step", metrics)
                self._finish_saves(blocking=False)
                if self._sigterm_agreed(flag):
                    path = self.save(wait=True)
                    raise PreemptedError(f"SIGTERM: saved checkpoint {path} at step {self.step}", self.step)
                if cfg.checkpoint and cfg.save_interval > 0 and self.step % cfg.save_interval == 0 and self.step < end:
                    self.save()
            if cfg.checkpoint:
                self.save(wait=True)
        except BaseException:
            if self.async_saves is not None:  # a save still in flight is not published
                self.async_saves.close(abort=True)
            raise
        finally:
            flag.restore()
        if self.async_saves is not None:
            self.async_saves.close()
        summary = {"step": self.step, "valid_loss": last_valid, "run_dir": str(self.run_dir)}
        self.on_event("done", summary)
        return summary

    def banner(self) -> dict[str, Any]:
        """What this run is, as data (the caller formats it)."""
        cfg = self.cfg
        return {
            "rank": self.layout.rank,
            "world_size": self.layout.world_size,
            "tp": self.layout.tp,
            "pp": self.layout.pp,
            "dp": self.layout.dp,
            "cp": self.layout.cp,
            "backend": self.layout.backend,
            "cpu_shims": _cpu_shims(),
            **_kernels(self.params_dtype, self.backend),
            "parameters": count_parameters(self.spec.model, self.spec.vocab_size),
            "vocab_size": self.shape.vocab_size,
            "padded_vocab_size": self.shape.padded_vocab_size,
            "precision": str(self.params_dtype).replace("torch.", ""),
            "datasets": [{"prefix": d.prefix, "weight": d.weight} for d in self.spec.datasets],
            "global_batch_size": cfg.global_batch_size,
            "seq_length": cfg.seq_length,
            "num_microbatches": self.num_microbatches,
            "micro_batch_size": cfg.micro_batch_size,
            "selection": ({"ratio": cfg.select_ratio, "scope": cfg.select_scope, "score": cfg.select_by,
                           **({"ratio_start": cfg.select_ratio_start} if cfg.select_ratio_start is not None else {}),
                           **({"after": cfg.select_after} if cfg.select_after else {}),
                           "scores": [s.prefix for s in self.spec.scores],
                           **_reference_banner(self.spec)} if self.selection.selective else None),
            "optimizer": {"name": cfg.optimizer, "kind": "distributed" if self.use_dist_opt else "fp32", "lr": cfg.lr,
                          "warmup_steps": cfg.warmup_steps, "decay_style": cfg.lr_decay_style, "min_lr": cfg.min_lr,
                          **({"wsd_decay_steps": wsd_decay_steps(cfg), "wsd_decay_style": cfg.lr_wsd_decay_style}
                             if cfg.lr_decay_style == "wsd" else {}),
                          "clip_grad": cfg.clip_grad},
            "start_step": self.step,
            "total_steps": cfg.steps,
            "config_hash": self.spec.config_hash(),
            "run_dir": str(self.run_dir),
        }


def _peak_memory_bytes() -> int:
    """This rank's peak so far: the CUDA caching allocator's peak allocation on a GPU, the process's
    peak resident set on the CPU (Linux reports ru_maxrss in KiB)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reference_banner(spec: RunSpec) -> dict[str, Any]:
    """Where the selection's reference losses come from, as the banner shows it."""
    source = spec.reference_source
    if source == "online":
        return {"reference": {"source": "online", "path": spec.reference.path,
                              "layers": spec.reference.model.num_layers, "hidden": spec.reference.model.hidden_size}}
    if source == "samples":
        return {"reference": {"source": "samples", "path": spec.sample_scores.prefix}}
    if source == "documents":
        return {"reference": {"source": "documents", "path": ", ".join(s.prefix for s in spec.scores)}}
    return {}


def _kernels(dtype: torch.dtype, backend) -> dict[str, str]:
    """What computes the layers and the loss on this rank (the same choices the model makes):
    the layer spec, the attention backend, and the selective-loss kernel for logits of ``dtype``.
    A forced kernel (RHO_KERNEL) that cannot run raises here, before the first step."""
    from cuda_ext import dispatch

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    choice = dispatch.choose(device, dtype)
    return {"layer_spec": backend.layer_spec, "attention": backend.attention,
            "loss_kernel": f"{choice.backend} ({choice.reason})"}


def _cpu_shims() -> list[str]:
    from parallel.cpu_compat import SHIMS, cpu_compat_active

    return sorted(SHIMS) if cpu_compat_active() else []


def _token_ids(spec: RunSpec):
    from parallel.data import TokenIds

    return TokenIds(vocab_size=spec.vocab_size, eod=spec.eod_id)
