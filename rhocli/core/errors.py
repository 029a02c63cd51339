"""The one error model of rho, and the one table of exit codes.

Stages and ``rhocli.core`` raise the ``RhoError`` classes below; the engine (``parallel``) and the
kernels (``cuda_ext``) raise their own types, which ``ENGINE_ERRORS`` assigns to one of these
categories. Only the CLI prints: ``rhocli.app.main`` turns an error into one red line and the exit
code ``exit_code_for`` gives. docs/errors.md lists every class and must stay in sync with
``EXIT_CODES`` and ``ENGINE_ERRORS`` (a test checks it).
"""

from __future__ import annotations

import errno
import os


class RhoError(Exception):
    """Base class of every error a user can cause. ``str(err)`` is the one line shown to the user."""

    exit_code = 1


class UsageError(RhoError):
    """A flag or argument value is invalid (the same code click uses for unknown flags)."""

    exit_code = 2


class MissingInputError(RhoError):
    """A file or directory named on the command line or in a config does not exist or cannot be read."""

    exit_code = 3


class BadInputError(RhoError):
    """Input exists but its content is malformed (invalid JSON, invalid UTF-8, missing key, ...)."""

    exit_code = 4


class OutputExistsError(RhoError):
    """The output would overwrite something the user has; pass --force to replace it."""

    exit_code = 5


class MismatchError(RhoError):
    """Two inputs do not belong together (tokenizer vs dataset, scores vs tokens, vocab vs model)."""

    exit_code = 6


class InUseError(RhoError):
    """Another rho process is writing the same output (a run directory, a score store)."""

    exit_code = 13


class NotAvailableError(RhoError):
    """The stage or code path exists in the CLI but is not implemented / not usable here."""

    exit_code = 7


class ConfigError(RhoError):
    """A YAML config file is malformed or names an unknown option."""

    exit_code = 8


class LoadError(RhoError):
    """A tokenizer, model or checkpoint exists but cannot be loaded."""

    exit_code = 9


class WorkerError(RhoError):
    """A worker process died (killed, out of memory) or a distributed run failed on another rank."""

    exit_code = 10


class NonFiniteError(RhoError):
    """Training produced a NaN/Inf loss or gradient norm; stopped before the optimizer step."""

    exit_code = 11


class Preempted(RhoError):
    """SIGTERM during training: a checkpoint was saved; rerun with --resume to continue."""

    exit_code = 12


class Interrupted(RhoError):
    """Ctrl-C / SIGINT: the shell convention 128 + 2. Outputs are only published when complete."""

    exit_code = 130


class StorageError(RhoError):
    """An output cannot be written where it goes: no space left, a read-only filesystem, permission
    denied. The partial output is removed; what was there before is untouched."""

    exit_code = 14


class Terminated(RhoError):
    """SIGTERM outside training (training saves and exits with Preempted): 128 + 15, cleaned up."""

    exit_code = 143


#: 1 is reserved for internal errors (bugs): anything that is neither a RhoError nor in ENGINE_ERRORS.
INTERNAL_ERROR_EXIT_CODE = 1

CATEGORIES: tuple[type[RhoError], ...] = (
    UsageError, MissingInputError, BadInputError, OutputExistsError, MismatchError, NotAvailableError,
    ConfigError, LoadError, WorkerError, NonFiniteError, Preempted, InUseError, Interrupted, Terminated,
    StorageError,
)
EXIT_CODES: dict[str, int] = {cls.__name__: cls.exit_code for cls in CATEGORIES}

#: The engine's and the kernels' error types, by qualified name (rhocli.core imports neither), and the
#: category each belongs to. Subclasses inherit their base's entry.
ENGINE_ERRORS: dict[str, type[RhoError]] = {
    "parallel.errors.DistributedSetupError": UsageError,
    "parallel.errors.LayoutError": UsageError,
    "parallel.errors.ModelConfigError": UsageError,
    "parallel.errors.NonFiniteValueError": NonFiniteError,
    "parallel.errors.PreemptedError": Preempted,
    "parallel.errors.StoreContentError": BadInputError,
    "parallel.errors.UnsupportedModelError": BadInputError,
    "parallel.errors.WeightsMismatchError": LoadError,
    "parallel.errors.CheckpointWriteError": StorageError,
    "cuda_ext.errors.KernelUnavailableError": NotAvailableError,
}


def category_for(err: BaseException) -> type[RhoError] | None:
    """The RhoError category of ``err`` (itself, or its ENGINE_ERRORS entry; an operating-system
    error of the storage, ``storage_cause``, is a StorageError); None for a bug."""
    if isinstance(err, RhoError):
        return type(err)
    for cls in type(err).__mro__:
        category = ENGINE_ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
        if category is not None:
            return category
    if storage_cause(err) is not None:
        return StorageError
    return None


#: errnos that say the storage refused a write (not a bug of rho's): no space, quota, read-only
#: filesystem, permission denied, a file too large for the filesystem
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def storage_cause(err: BaseException) -> OSError | None:
    """The OSError of the storage behind ``err`` (itself, or what it was raised from), if any."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def one_line(err: BaseException) -> str:
    """The line a user sees for a categorised error: its text, or for a storage error the path and
    the cause ("/data/out.bin: No space left on device")."""
    cause = storage_cause(err) if not isinstance(err, RhoError) else None
    if cause is None:
        return str(err)
    where = cause.filename if cause.filename is not None else "an output"
    return f"{where}: {cause.strerror or os.strerror(cause.errno)} (nothing partial is kept; what was there is untouched)"


def exit_code_for(err: BaseException) -> int:
    category = category_for(err)
    return INTERNAL_ERROR_EXIT_CODE if category is None else category.exit_code
