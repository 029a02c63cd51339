"""The one place rhocli imports megatron-core's dataset format (``megatron.core.datasets``).

Importing megatron-core costs seconds (it pulls in torch and torch.compile), so stages import it
lazily, and ``rho tokenize`` does it on a background thread while the workers already tokenize.
Its "Transformer Engine and Apex are not installed" warnings are expected on CPU and silenced.

Every rho process imports megatron-core through ``import_megatron`` (the train and score ranks and
specs before they import the engine, the dataset readers here): quietly, with ``torch.compile``
deferred to each decorated helper's first call (``lazy_torch_compile``), and without the wandb
import megatron-core attempts for logging rho does not use (``without_wandb``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from types import ModuleType

_lock = threading.Lock()


def quiet_megatron() -> None:
    """Silence megatron-core's import-time warnings that are expected here (no TE/Apex on CPU,
    deprecations of options rho does not use) and its INFO logging."""
    for pattern in (r".*Transformer Engine and Apex.*", r".*apex.*", r".*full scope is deprecated.*",
                    r".*torch.jit.script.* is deprecated.*", r".*dynamic_context.py.*",
                    # torch deprecations inside megatron's dist_checkpointing (loading a checkpoint)
                    r".*`load_state_dict` is deprecated.*", r".*Please use DTensor instead.*",
                    # torch 2.13 renamed collectives megatron-core calls (sequence parallelism)
                    r".*`torch.distributed.\w+` is deprecated. Please use `torch.distributed.\w+` instead.*",
                    # the fp32 distributed optimizer's main parameters are views of the model's
                    r".*The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.*",
                    # selective recompute of core attention: rho uses megatron's own attention, not TE's
                    r".*you have no need to set 'core_attn' to recompute.*",
                    # a checkpoint read in one process (rho eval / convert-hf loading tensors without ranks)
                    r".*torch.distributed is disabled, unavailable or uninitialized.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # a checkpoint writer's failure is logged there before it is raised; rho reports it, in one line
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def lazy_torch_compile():
    """Import megatron-core with ``torch.compile`` deferred to each decorated function's first call.

    megatron-core decorates its fusion helpers with ``torch.compile`` at import time, which imports
    TorchInductor: 4.6 s of a 17 s `rho train` of the tiny config on the 2-core VM (38 decorated helpers).
    rho's models call none of them on CPU (bias/activation, RoPE and softmax fusions are off), so a
    process never pays for the compiler it does not use; a helper that is called is compiled on
    that call, exactly as it would have been.
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


@contextlib.contextmanager
def without_wandb():
    """Import megatron-core without letting it import wandb (when nothing has yet).

    megatron-core's timers and inference context try ``import wandb`` at import time for their own
    logging, which rho never hands them (rho's W&B sink imports wandb itself, when asked for). With
    wandb installed (an extra) that import is ~0.45 s of every rank's start-up on the 2-core VM. For
    the import's duration ``sys.modules["wandb"]`` is None, so their ``try: import wandb`` takes its
    ImportError branch; afterwards the entry is removed and wandb imports normally."""
    import sys

    if "wandb" in sys.modules:  # already imported (or blocked): leave it as it is
        yield
        return
    sys.modules["wandb"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


def import_megatron() -> ModuleType:
    """``megatron.core``, imported quietly with ``torch.compile`` deferred and without wandb (once
    per process; a later call returns the module)."""
    with _lock:
        quiet_megatron()
        import sys

        if "megatron.core" not in sys.modules:
            with lazy_torch_compile(), without_wandb():  # the packages whose modules decorate helpers at import
                import megatron.core  # noqa: F401
                import megatron.core.models.gpt  # noqa: F401
                import megatron.core.optimizer  # noqa: F401
                import megatron.core.pipeline_parallel  # noqa: F401
        return sys.modules["megatron.core"]


def indexed_dataset() -> ModuleType:
    """``megatron.core.datasets.indexed_dataset``, imported quietly."""
    import_megatron()
    from megatron.core.datasets import indexed_dataset as module

    return module


class BackgroundImport:
    """Import ``indexed_dataset`` on a thread; ``get()`` waits for it and re-raises its error."""

    def __init__(self) -> None:
        self._module: ModuleType | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rho-import-megatron", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._module = indexed_dataset()
        except BaseException as err:  # surfaced by get()
            self._error = err

    def ready(self) -> bool:
        return not self._thread.is_alive()

    def get(self) -> ModuleType:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._module is not None
        return self._module
