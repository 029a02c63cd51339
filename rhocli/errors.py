"""The one error model of rho.

Library code raises these; only the CLI layer (``rhocli.cli``) turns them into one red line and an
exit code. Each class has its own exit code so scripts can tell failures apart; the table lives in
``docs/errors.md`` and must stay in sync with ``EXIT_CODES`` below (a test checks it).
"""

from __future__ import annotations


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


class Interrupted(RhoError):
    """Ctrl-C / SIGINT: the shell convention 128 + 2. Outputs are only published when complete."""

    exit_code = 130


#: 1 is reserved for internal errors (bugs): anything that is not a RhoError.
INTERNAL_ERROR_EXIT_CODE = 1

EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        UsageError,
        MissingInputError,
        BadInputError,
        OutputExistsError,
        MismatchError,
        NotAvailableError,
        ConfigError,
        LoadError,
        WorkerError,
        Interrupted,
    )
}


class NonFiniteError(RhoError):
    """Training produced a NaN/Inf loss or gradient norm; stopped before the optimizer step."""

    exit_code = 11


class Preempted(RhoError):
    """SIGTERM during training: a checkpoint was saved; rerun with --resume to continue."""

    exit_code = 12


EXIT_CODES.update({NonFiniteError.__name__: NonFiniteError.exit_code, Preempted.__name__: Preempted.exit_code})
