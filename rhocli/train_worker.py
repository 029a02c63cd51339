"""One rank of ``rho train`` (started through ``rhocli.launch``): the engine's exceptions become
rho errors with their exit codes."""

from __future__ import annotations

from typing import Any

from rhocli.errors import MismatchError, NonFiniteError, Preempted, UsageError


def run_rank(spec_dict: dict[str, Any], on_event=None) -> dict[str, Any] | None:
    """Run this process's rank; raises RhoError subclasses."""
    from parallel import trainer as engine
    from parallel.checkpoint import CheckpointError
    from parallel.distributed import destroy_distributed, init_distributed
    from rhocli.train_spec import spec_from_dict

    spec = spec_from_dict(spec_dict)
    try:
        try:
            layout = init_distributed(spec.train.tp, spec.train.pp, spec.train.seed)
        except ValueError as err:
            raise UsageError(str(err)) from None
        handler = on_event if (on_event is not None and layout.rank == 0) else None
        try:
            return engine.Trainer(spec, layout, on_event=handler).run()
        except engine.NonFiniteError as err:
            raise NonFiniteError(str(err)) from None
        except engine.Preempted as err:
            raise Preempted(f"{err}; continue with: rho train ... --resume") from None
        except CheckpointError as err:
            raise MismatchError(str(err)) from None
        except ValueError as err:
            raise UsageError(str(err)) from None
    finally:
        destroy_distributed()
