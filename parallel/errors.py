"""The engine's own error types.

The engine (``parallel``) knows nothing of the command line: its messages name sizes, files and
config keys, never flags. ``rhocli.core.errors.ENGINE_ERRORS`` is the one table that says which
user-facing category (and so which exit code) each of these is; a test keeps the two in step.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose (anything else is a bug)."""


class DistributedSetupError(EngineError):
    """The process environment cannot form a process group (RANK, WORLD_SIZE, ... missing; a rank
    bound to a device that does not exist)."""


class LayoutError(EngineError):
    """A parallel layout that does not fit the model, the world size or the batch.

    Structured so that the caller can name the sizes its own way: ``template`` holds ``{tp}``,
    ``{pp}``, ``{dp}`` placeholders, ``sizes`` their values (None: the name alone). ``str(err)``
    names them ``tp 2``; ``err.render({"tp": "--tp"})`` names them ``--tp 2``.
    """

    def __init__(self, template: str, **sizes: int | None):
        self.template = template
        self.sizes = sizes
        super().__init__(self.render({}))

    def render(self, names: dict[str, str]) -> str:
        def named(key: str) -> str:
            value = self.sizes[key]
            name = names.get(key, key)
            return name if value is None else f"{name} {value}"

        return self.template.format(**{key: named(key) for key in self.sizes})


class ModelConfigError(EngineError):
    """A model shape megatron-core refuses (its TransformerConfig checks)."""


class NonFiniteValueError(EngineError):
    """A NaN/Inf loss, gradient norm or parameter; raised before any weight changes or is saved."""


class PreemptedError(EngineError):
    """SIGTERM arrived; a checkpoint was saved at ``step``."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class StoreContentError(EngineError):
    """A token, score or mask store whose content cannot be what its writer wrote (e.g. a NaN
    reference loss); the message names the file."""


class UnsupportedModelError(EngineError, ValueError):
    """A Hugging Face model the name map refuses (architecture or option rho does not build)."""


class WeightsMismatchError(EngineError):
    """Weights that do not fit the model built from their config (shapes, missing tensors)."""


class CheckpointWriteError(EngineError):
    """A checkpoint could not be written: the storage refused it (full, read-only). The partial
    checkpoint is removed; the previous one and ``latest`` are untouched."""

