"""``rho convert-hf``: Hugging Face Llama / Mistral <-> rho checkpoints.

CPU (conversion needs no GPU; it runs in one process):

    rho convert-hf --from-hf ~/models/TinyLlama-1.1B runs/tinyllama-init      # HF -> rho (reshardable)
    rho convert-hf runs/slm hf/tinyllama-slm --dtype bf16 --tokenizer ~/models/TinyLlama-1.1B
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
    dtype: Annotated[str, typer.Option("--dtype", help="Export: bf16, fp16 or fp32.")] = "bf16",
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Export: tokenizer file or directory to include.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Convert between Hugging Face Llama/Mistral and rho checkpoints."""
    from rhocli.commands.console import lit, out
    from rhocli.core.megatron_io import quiet_megatron

    quiet_megatron()
    if not from_hf:
        from rhocli.convert.hf import export_hf

        result = export_hf(source, output, dtype=dtype, tokenizer=tokenizer, force=force)
        note = "" if result["tokenizer_files"] else " (no tokenizer files: pass --tokenizer)"
        out.print(f"[green]wrote[/] {lit(result['output'])}: {result['shards']} safetensors shard(s){note}")
        return
    from rhocli.convert.hf import import_hf

    result = import_hf(source, output, force=force)
    out.print(f"[green]wrote[/] {lit(result['output'])} ({result['architecture']}, {result['layers']} layers, vocab {result['vocab']}); "
              f"use it with rho train --init / rho score --model")
