"""Run the ``rho`` CLI in-process (fast: megatron-core is imported once per test session)."""

from __future__ import annotations

import dataclasses

from rhocli.app import main


@dataclasses.dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def run_rho(capsys, *args: str) -> Result:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)
