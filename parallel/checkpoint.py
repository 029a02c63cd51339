"""Saving and loading a model (and optimizer) with megatron-core ``dist_checkpointing``: reshardable
across TP/PP/DP, plus each rank's RNG states for an exact resume.

Where a checkpoint goes and how it is published is the caller's: ``save_checkpoint`` writes through a
store (``rhocli.core.formats.checkpoint.CheckpointStore`` or anything with its ``staging_dir`` /
``begin`` / ``publish``), so the engine never decides a file layout or writes a manifest itself.

    save_checkpoint(store, step, [model], optimizer, fields)     # every rank (collective)
    load_checkpoint(step_dir, [model], optimizer, saved_world_size=4)

Asynchronous saves (``AsyncSaves``): megatron-core's own -- ``dist_checkpointing.save(...,
async_sharded_save=True)`` gives an ``AsyncRequest`` that its ``AsyncCallsQueue`` runs in a forked
writer process while training goes on; the request's finalize functions run on every rank once every
rank's writer is done, and the last of them publishes the step (``latest`` moves). A run killed
before that keeps the previous checkpoint as ``latest``; the half-written staging directory is
removed by the next start (``clean_stale_temporaries``).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

from parallel.errors import CheckpointWriteError

import torch


class CheckpointSink(Protocol):
    def step_dir(self, step: int) -> Path: ...
    def staging_dir(self, step: int) -> Path: ...
    def begin(self, step: int) -> Path: ...
    def publish(self, step: int, fields: dict[str, Any]) -> Path: ...


def _model_keys(model_chunks) -> list[str]:
    """Megatron-LM's names: "model" for one chunk, "model0", "model1", ... under a virtual pipeline.
    The tensors inside are keyed by global layer numbers, so a checkpoint reshards across any of them."""
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _sharded_state_dict(model_chunks, optimizer, is_loading: bool) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        module = getattr(chunk, "module", chunk)
        state[key] = module.sharded_state_dict()
    if optimizer is not None:
        models = {k: state[k] for k in _model_keys(model_chunks)}
        model_state = models["model"] if len(models) == 1 else models
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA)
    return state


#: how megatron-core lays out a distributed optimizer's state in a checkpoint (ignored by the plain
#: optimizer): Megatron-LM's default, ``dp_reshardable`` -- each rank saves and loads its own shard,
#: no gather, and a resume may change the data-parallel size (not TP or PP)
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> bool:
    """Restore RNG states saved on the same kind of device; False (seeds stay) across CPU/GPU."""
    from megatron.core import tensor_parallel

    if ("cuda" in state) != torch.cuda.is_available():
        return False
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    return True


def save_checkpoint(store: CheckpointSink, step: int, model_chunks, optimizer, fields: dict[str, Any],
                    async_saves: "AsyncSaves | None" = None) -> Path:
    """Save on every rank (collective); rank 0 publishes with ``fields`` (plus the world size) as the
    manifest. Returns the step directory: published on return, or -- with ``async_saves`` -- once
    ``async_saves.finalize`` reports it."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    tmp = store.staging_dir(step)
    if rank == 0:
        store.begin(step)
    dist.barrier()
    manifest = {"world_size": dist.get_world_size(), **fields}
    state = _sharded_state_dict(model_chunks, optimizer, is_loading=False)
    if async_saves is not None:
        async_saves.schedule(store, step, state, tmp, manifest)
        return store.step_dir(step)
    use_in_process_write_results()
    try:
        # dist_checkpointing wants an empty directory; per-rank RNG states go in beside its files after.
        dist_checkpointing.save(state, str(tmp))
        _save_rng_state(tmp, rank)
    except BaseException as err:  # torch's CheckpointException is a BaseException
        problem = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else storage_problem(tmp)
        if problem is None:  # not the storage: a bug (or an interrupt), raised as it is
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"{tmp}: checkpoint of step {step} not written ({problem}); the previous "
                                   "checkpoint and 'latest' are untouched") from err
    _fault_injection_pause()
    dist.barrier()
    if rank == 0:
        store.publish(step, manifest)
    dist.barrier()
    return store.step_dir(step)


#: below this much free space, a failed write is taken to be a full filesystem (torch's writers report
#: a short write as "unexpected pos", without the errno)
FULL_BELOW_BYTES = 64 * 2**20


def storage_problem(path: Path) -> str | None:
    """Why the filesystem of ``path`` refuses writes, if it does: read-only, or (nearly) full."""
    try:
        stat = os.statvfs(path if path.exists() else path.parent)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return "read-only filesystem"
    free = stat.f_bavail * stat.f_frsize
    if free < FULL_BELOW_BYTES:
        return f"no space left on device: {free / 2**20:.1f} MiB free"
    return None


def _save_rng_state(tmp: Path, rank: int) -> None:
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")


class AsyncSaves:
    """This rank's checkpoints in flight (``--async-save``), through megatron-core's ``AsyncCallsQueue``.

    ``schedule`` (collective) plans the save, lets megatron-core fork its writer and returns at once;
    ``finalize`` (collective; every rank calls it at the same points) publishes the saves whose
    writes are complete on every rank -- all of them with ``blocking=True`` -- and returns their
    (step, directory). ``close`` ends the queue: after a failure with ``abort=True`` the writers are
    killed and nothing more is published.

    ``child_setup`` runs first in every process this starts (the writer, and the server of the
    queue that carries the writers' results back): the caller's way to make them die with this rank
    (the engine does not decide process policy).
    """

    def __init__(self, child_setup: Callable[[], None] | None = None):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._calls = AsyncCallsQueue(persistent=False)
        self._child_setup = child_setup
        self._published: list[tuple[int, Path]] = []
        self._manager = None

    def pending(self) -> int:
        return self._calls.get_num_unfinalized_calls()

    def schedule(self, store: CheckpointSink, step: int, state: dict[str, Any], tmp: Path, manifest: dict[str, Any]) -> None:
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        self._use_write_results_queue()
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        # the writer process: made to die with this rank, and (test hook) held after its writes
        request = request._replace(async_fn=functools.partial(_writer, request.async_fn, self._child_setup))
        _save_rng_state(tmp, dist.get_rank())

        def publish() -> None:  # the last finalize function: every rank's files are complete
            if dist.get_rank() == 0:
                store.publish(step, manifest)
            dist.barrier()
            self._published.append((step, store.step_dir(step)))

        request.add_finalize_fn(publish)
        self._calls.schedule_async_request(request)

    def finalize(self, blocking: bool) -> list[tuple[int, Path]]:
        if not self.pending():  # the same answer on every rank: saves are scheduled collectively
            return []
        self._calls.maybe_finalize_async_calls(blocking=blocking)
        done, self._published = self._published, []
        return done

    def close(self, abort: bool = False) -> None:
        if abort:
            for call in list(self._calls.async_calls):
                call.async_caller.close(abort=True)
            self._calls.async_calls.clear()
        else:
            self.finalize(blocking=True)
        if self._manager is not None:
            self._manager.shutdown()
            self._manager = None

    def _use_write_results_queue(self) -> None:
        """megatron-core's writer returns its results through ``filesystem_async._results_queue``:
        a queue served by a ``multiprocessing`` Manager (a pipe could fill up while this rank only
        reads it after the writer has ended). megatron-core would spawn that server with no link to
        this rank; this one is forked (no re-import of torch) and runs ``child_setup``."""
        from multiprocessing import get_context
        from multiprocessing.managers import SyncManager

        from megatron.core.dist_checkpointing.strategies import filesystem_async

        if self._manager is None:
            self._manager = SyncManager(ctx=get_context("fork"))
            self._manager.start(initializer=self._child_setup)
            filesystem_async._results_queue = self._manager.Queue()


def _writer(write: Callable[..., None], child_setup: Callable[[], None] | None, *args, **kwargs) -> None:
    """megatron-core's writer function, in its forked process."""
    if child_setup is not None:
        child_setup()
    write(*args, **kwargs)
    _fault_injection_pause()


def use_in_process_write_results() -> None:
    """Keep a synchronous save's write results in this process, not in a server process.

    megatron-core's torch_dist save (``strategies/filesystem_async.py``) hands each save's write
    results through ``_results_queue``, by default a ``multiprocessing.Manager().Queue()`` served by a
    *spawned* process, so that an asynchronous save's writer process can return them. That server
    unpickles every result, so it imports torch on the first save of each rank (measured: 2.6 s of a
    4.6 s tiny-model save on 2 cores, per rank), and nothing in it watches its parent (a ``kill -9``
    of the trainer left it waiting forever). A synchronous save puts and gets its results in this
    process, in the same thread (``AsyncRequest.execute_sync``): a ``queue.Queue`` carries them.
    Call before the first synchronous save; a megatron-core without that module-level queue, or one
    already made, is left alone. ``save_checkpoint`` calls it.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None:  # made already, or another layout
        return
    import queue

    filesystem_async._results_queue = queue.Queue()


def _fault_injection_pause() -> None:
    """Test hook: RHO_FAULT_SLEEP_IN_SAVE=SECONDS holds a save between writing and publishing, so a
    test can kill the run at exactly that moment. Unset in normal use."""
    seconds = os.environ.get("RHO_FAULT_SLEEP_IN_SAVE")
    if seconds:
        import time

        time.sleep(float(seconds))


def _materialize_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its (placeholder) Adam state before a checkpoint is loaded
    into it.

    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` starts from ``state_dict()``, which
    without Apex or Transformer Engine (PyTorch's own Adam: CPU runs, and GPU machines without
    them) reads the step from each parameter's state and asserts there is exactly one value; a
    fresh optimizer has no state yet, so every resume failed. megatron-core fills the state with
    placeholders for exactly this (``_init_optimizer_states_with_dummy_values``: one step on zero
    gradients, at the scheduler's initial learning rate); the load then overwrites every value.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if type(opt).__name__ == "DistributedOptimizer" and inner is not None and not inner.state and init:
            init()


def _restore_step_counts(optimizer) -> None:
    """Give every parameter of a loaded distributed optimizer its own, saved Adam step counter.

    Without Apex or Transformer Engine, megatron-core 0.16 keeps PyTorch Adam's per-parameter step
    in the checkpoint's param groups, and its load gets it wrong twice: ``load_state_dict`` puts
    *one* shared tensor into every parameter's state (Adam then adds 1 to it once per parameter each
    step), and the dp_reshardable load then copies the placeholder state's step over it (the step
    count restarts at 1). Either way the bias correction after a resume was wrong (the 4th loss of a
    2 + 2 step run differed from a straight run by 0.02-0.04). The saved step is still in each param
    group (``param_group["step"]``): every parameter gets its own copy of it.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(opt).__name__ != "DistributedOptimizer" or inner is None:
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state is not None and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype,
                                                 device=state["step"].device)


def load_checkpoint(step_dir: Path, model_chunks, optimizer=None, saved_world_size: int | None = None) -> None:
    """Load weights (and optimizer state) on every rank; with ``saved_world_size`` equal to this
    world's, also this rank's RNG states (an exact resume; another layout keeps the seeds)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if optimizer is not None:
        _materialize_distributed_optimizer_state(optimizer)
    state = dist_checkpointing.load(_sharded_state_dict(model_chunks, optimizer, is_loading=True), str(step_dir))
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        chunk.load_state_dict(state[key], strict=True)
    if optimizer is not None:
        # no autograd: megatron-core copies the distributed optimizer's loaded shards into its main
        # parameters in place (``_set_main_param_and_optimizer_states``) outside no_grad on the
        # dp_reshardable path, which PyTorch refuses for a leaf that requires grad (or a view of one)
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
        _restore_step_counts(optimizer)
    if saved_world_size is not None:
        rng_file = Path(step_dir) / "rng" / f"rank{dist.get_rank():05d}.pt"
        if saved_world_size == dist.get_world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
