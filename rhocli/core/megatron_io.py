"""The one place rhocli imports megatron-core's dataset format (``megatron.core.datasets``).

Importing megatron-core costs seconds (it pulls in torch and torch.compile), so stages import it
lazily, and ``rho tokenize`` does it on a background thread while the workers already tokenize.
Its "Transformer Engine and Apex are not installed" warnings are expected on CPU and silenced.
"""

from __future__ import annotations

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
                    r".*`load_state_dict` is deprecated.*", r".*Please use DTensor instead.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("megatron").setLevel(logging.WARNING)


def indexed_dataset() -> ModuleType:
    """``megatron.core.datasets.indexed_dataset``, imported quietly."""
    with _lock:
        quiet_megatron()
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
