"""``rho score``: per-token reference losses for a token dataset, aligned to its documents.

CPU:

    rho score --model runs/ref --data out/corpus --output out/corpus.ref
    rho score --model runs/ref --data out/corpus --output out/corpus.ref --tp 2 --pp 2 --resume
    rho score --model hf/TinyLlama-1.1B --data out/corpus --output out/corpus.ref   # a HF Llama/Mistral dir
    rho score --model runs/ref --data out/corpus --output out/corpus.ref --entropy  # + out/corpus.ref.entropy
    # the samples a training run reads, each token in its training context (a sample store)
    rho score --model runs/ref --for-run configs/tiny.yaml --data out/corpus --set train.steps=200 -o out/corpus.samples

One GPU:

    rho score --model runs/tinyllama-ref --data data/owm --output data/owm.ref --micro-batch-size 16

Under torchrun (every process is a rank; DP ranks split the documents):

    torchrun --nproc-per-node 8 -m rhocli score --model runs/ref --data data/owm --output data/owm.ref --tp 2
"""

from __future__ import annotations

import os
from pathlib import Path
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
            if "samples" in p:  # --for-run: a run's training samples, step by step
                out.print(f"scoring {p['samples']:,} training samples of {p['seq_length']} tokens ({p['steps']} steps)"
                          + (f" from step {p['resumed_steps'] + 1} (resumed)" if p["resumed_steps"] else ""))
            else:
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
            elif "step" in p:
                out.print(f"step {p['step'] + 1}/{p['steps_total']}  {tps} tok/s")
            else:
                out.print(f"shard {p['shard'] + 1}/{p['shards_total']}  {tps} tok/s")
        elif kind == "done":
            self.close()
            if p:
                files = ".bin/.json" if "samples" in p else ".bin/.idx/.json"
                out.print(f"[green]wrote[/] {lit(p['output'])}{files}: {p['tokens']:,} token scores, mean {p['mean']:.4f}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def score_command(
    model: Annotated[str, typer.Option("--model", help="Reference model: a rho checkpoint (run or step directory) or a Hugging Face Llama/Mistral directory (config.json + safetensors).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Score store prefix: writes PREFIX.bin/.idx/.json (a sample store: PREFIX.bin/.json).")],
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Token dataset prefix to score; with --for-run, the run's --data (PREFIX or PREFIX:WEIGHT, repeat to blend).")] = None,
    for_run: Annotated[Optional[Path], typer.Option("--for-run", help="Score the training samples of this rho train config (with --data and --set as the run gives them): a sample store, each token in its training context.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="With --for-run: the run's overrides, train.KEY=VALUE.")] = None,
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
    from rhocli.core.errors import UsageError
    from rhocli.core.launch import world_from_env
    from rhocli.core.megatron_io import quiet_megatron
    from rhocli.score.run import run_scoring
    from rhocli.score.spec import build_score_job

    quiet_megatron()
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if for_run is not None:
        for flag, given in (("--seq-len", seq_len), ("--stride", stride)):
            if given is not None:
                raise UsageError(f"{flag} is for document stores; --for-run scores the run's samples (its seq_length)")
        _score_run_samples(model, for_run, data, list(set_ or []), output, tp, pp, dp, micro_batch_size, resume, force,
                           sequence_parallel, entropy, quiet)
        return
    if set_:
        raise UsageError("--set needs --for-run (the run configuration it overrides)")
    if not data or len(data) != 1:
        raise UsageError("--data: give the one token dataset to score (or --for-run CONFIG with the run's --data)")
    data = data[0]
    job, world = build_score_job(
        model, data, output, tp, pp, dp, seq_len, stride, micro_batch_size, resume, force, shard_documents,
        world_size=world_from_env(), sequence_parallel=sequence_parallel, entropy=entropy,
    )
    run_scoring(job, world, force, resume, None if quiet else ScoreRenderer)


def _score_run_samples(model, config: Path, data, sets: list[str], output: str, tp: int, pp: int, dp, mbs, resume: bool,
                       force: bool, sequence_parallel: bool, entropy: bool, quiet: bool) -> None:
    """``--for-run``: the run's pipeline from its configuration (as ``rho train`` reads it), then a
    sample store of its samples."""
    from rhocli.core.launch import world_from_env
    from rhocli.score.samples import build_sample_score_job, run_sample_scoring
    from rhocli.train.selection_inputs import run_pipeline
    from rhocli.train.spec import load_run_configs, resolve_run_data, steps_from_epochs

    _, train_cfg = load_run_configs(config, {"data": tuple(data) if data else None}, sets)
    train_cfg = steps_from_epochs(train_cfg)
    refs, tokenizer_fp, data_vocab, eod, _ = resolve_run_data(train_cfg)
    if eod is None:
        from rhocli.core.errors import MismatchError

        raise MismatchError(f"--data {refs[0].prefix}: the manifest names no end-of-document id")
    job, world = build_sample_score_job(model, train_cfg, refs, tokenizer_fp, data_vocab, int(eod),
                                        run_pipeline(train_cfg, refs, int(eod)), output, tp, pp, dp, mbs, resume,
                                        force, world_size=world_from_env(), sequence_parallel=sequence_parallel,
                                        entropy=entropy, config_name=f"--for-run {config}")
    run_sample_scoring(job, world, force, resume, None if quiet else ScoreRenderer)
