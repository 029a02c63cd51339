"""``rho convert-hf``: Hugging Face Llama / Mistral <-> rho checkpoints.

CPU (conversion needs no GPU; it runs in one process):

    rho convert-hf --from-hf ~/models/TinyLlama-1.1B runs/tinyllama-init      # HF -> rho (reshardable)
    rho train configs/tinyllama-1.1b.yaml --init runs/tinyllama-init --tp 2 --pp 2 ...

On one GPU / under torchrun: run it once, before training; the checkpoint reshards to any TP/PP.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def convert_command(
    source: Annotated[str, typer.Argument(help="With --from-hf: a HF model directory; else a rho checkpoint.")],
    output: Annotated[str, typer.Argument(help="With --from-hf: the rho run directory to write; else a HF directory.")],
    from_hf: Annotated[bool, typer.Option("--from-hf", help="Import a Hugging Face Llama/Mistral model.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Convert between Hugging Face Llama/Mistral and rho checkpoints."""
    from rhocli.console import out
    from rhocli.errors import NotAvailableError
    from rhocli.megatron_io import quiet_megatron

    quiet_megatron()
    if not from_hf:
        raise NotAvailableError("rho convert-hf CKPT OUT_DIR (export to Hugging Face) is not yet available; --from-hf is")
    from rhocli.convert import import_hf

    result = import_hf(source, output, force=force)
    out.print(f"[green]wrote[/] {result['output']} ({result['architecture']}, {result['layers']} layers, vocab {result['vocab']}); "
              f"use it with rho train --init / rho score --model")
