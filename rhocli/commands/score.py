"""``rho score``: per-token reference losses for a token dataset, aligned to its documents.

CPU:

    rho score --model runs/ref --data out/corpus --output out/corpus.ref
    rho score --model runs/ref --data out/corpus --output out/corpus.ref --tp 2 --pp 2 --resume
    rho score --model hf/TinyLlama-1.1B --data out/corpus --output out/corpus.ref   # a HF Llama/Mistral dir
    rho score --model runs/ref --data out/corpus --output out/corpus.ref --entropy  # + out/corpus.ref.entropy

One GPU:

    rho score --model runs/tinyllama-ref --data data/owm --output data/owm.ref --micro-batch-size 16

Under torchrun (every process is a rank; DP ranks split the documents):

    torchrun --nproc-per-node 8 -m rhocli score --model runs/ref --data data/owm --output data/owm.ref --tp 2
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Optional

import typer

from rhocli.commands.console import human_count, lit, out


class ScoreRenderer:
    """Rank 0's progress: shards, tokens/s, ETA."""

    def __init__(self) -> None:
        self._progress = None
        self._task = None
        self._total = 0

    def __call__(self, kind: str, p: dict[str, Any]) -> None:
        if kind == "start":
            self._total = p["tokens"]
            out.print(f"scoring {p['documents']:,} documents, {p['tokens']:,} tokens in {p['shards']} shards"
                      + (f" ({p['resumed_shards']} already done)" if p["resumed_shards"] else ""))
            if out.is_terminal:
                from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

                self._progress = Progress(TextColumn("[bold]score[/]"), BarColumn(),
                                          TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(), console=out)
                self._progress.start()
                self._task = self._progress.add_task("score", total=p["tokens"], tps="-")
        elif kind == "progress":
            tps = human_count(p["tokens"] / p["elapsed_s"]) if p["elapsed_s"] > 0 else "-"
            if self._progress is not None:
                self._progress.update(self._task, completed=min(p["tokens"], self._total), tps=tps)
            else:
                out.print(f"shard {p['shard'] + 1}/{p['shards_total']}  {tps} tok/s")
        elif kind == "done":
            self.close()
            if p:
                out.print(f"[green]wrote[/] {lit(p['output'])}.bin/.idx/.json: {p['tokens']:,} token scores, mean {p['mean']:.4f}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def score_command(
    model: Annotated[str, typer.Option("--model", help="Reference model: a rho checkpoint (run or step directory) or a Hugging Face Llama/Mistral directory (config.json + safetensors).")],
    data: Annotated[str, typer.Option("--data", help="Token dataset prefix to score.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Score store prefix: writes PREFIX.bin/.idx/.json.")],
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel size.")] = 1,
    pp: Annotated[int, typer.Option("--pp", help="Pipeline-parallel size.")] = 1,
    dp: Annotated[Optional[int], typer.Option("--dp", help="Data-parallel size (ranks split the documents).")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Context window (default: the model's training sequence length).")] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Sliding-window stride for long documents (default: half the window).")] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option("--micro-batch-size", help="Windows per forward pass (default: about 4,096 positions per forward on CPU, 16,384 on a GPU).")] = None,
    shard_documents: Annotated[int, typer.Option("--shard-documents", help="Documents per resumable shard.")] = 2048,
    sequence_parallel: Annotated[bool, typer.Option("--sequence-parallel", help="Split norms and the residual stream over the TP ranks along the sequence (TP > 1).")] = False,
    entropy: Annotated[bool, typer.Option("--entropy", help="Also store the model's entropy at each token (OUTPUT.entropy), for rho train/select --select-by entropy.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run (finished shards are kept).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing store / restart an unfinished run.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Score every token of a dataset with a reference model (forward only, TP/PP/DP)."""
    from rhocli.core.launch import world_from_env
    from rhocli.core.megatron_io import quiet_megatron
    from rhocli.score.run import run_scoring
    from rhocli.score.spec import build_score_job

    quiet_megatron()
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    job, world = build_score_job(
        model, data, output, tp, pp, dp, seq_len, stride, micro_batch_size, resume, force, shard_documents,
        world_size=world_from_env(), sequence_parallel=sequence_parallel, entropy=entropy,
    )
    run_scoring(job, world, force, resume, None if quiet else ScoreRenderer)
