"""``rho train``: causal-LM or selective (Rho-1 SLM) training on megatron-core with TP / PP / DP,
checkpoints, exact resume.

CPU (gloo; rho starts tp x pp x dp worker processes itself):

    rho train configs/tiny.yaml --data out/gsm8k --save runs/ref --steps 200
    rho train configs/tiny.yaml --data out/gsm8k --save runs/ref --tp 2 --pp 2
    rho train configs/tiny.yaml --data out/gsm8k --save runs/ref --resume      # continue exactly

Selective language modeling (scores from ``rho score`` with a reference model):

    rho train configs/tiny.yaml --data out/corpus --scores out/corpus.ref --select-ratio 0.6 --save runs/slm

The reference model run online, on the very samples each step trains on (the excess on one context):

    rho train configs/tiny.yaml --data out/corpus --reference runs/ref --select-ratio 0.6 --save runs/slm

Supervised fine-tuning on the responses (rho tokenize --response-key writes PREFIX.mask), examples packed
without attending to each other:

    rho train configs/sft-tora-1b.yaml --data out/tora --mask out/tora.mask --pack whole --separate-documents \
        --epochs 3 --init runs/base

One GPU (NCCL, bf16):

    rho train configs/tinyllama-1.1b.yaml --data data/owm:0.9 --data data/gsm8k:0.1 --save runs/ref

Multi-node: plain torchrun, one agent per node; each process runs as a worker directly:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m rhocli train configs/mistral-7b.yaml --tp 4 --pp 2 --data ... --save /shared/runs/x
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rhocli.commands.console import lit, out


def train_command(
    config: Annotated[Path, typer.Argument(help="Run YAML with model: and train: sections (e.g. configs/tiny.yaml).")],
    tp: Annotated[Optional[int], typer.Option("--tp", help="Tensor-parallel size.")] = None,
    pp: Annotated[Optional[int], typer.Option("--pp", help="Pipeline-parallel size.")] = None,
    dp: Annotated[Optional[int], typer.Option("--dp", help="Data-parallel size (default: world / (tp x pp x cp); 1 when rho launches).")] = None,
    cp: Annotated[Optional[int], typer.Option("--cp", help="Context-parallel size: each sequence split over this many ranks (long sequences; Transformer Engine on GPU).")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Token dataset PREFIX or PREFIX:WEIGHT; repeat to blend.")] = None,
    save: Annotated[Optional[str], typer.Option("--save", help="Run directory (checkpoints, metrics.jsonl).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps in total.")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Instead of --steps: passes over the --data tokens (steps = ceil(epochs x tokens / (seq_length x global batch))).")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue the run in --save exactly from its latest checkpoint.")] = None,
    init: Annotated[Optional[str], typer.Option("--init", help="Start from these weights only (new optimizer, step 0): a rho checkpoint (run or step directory) or a Hugging Face Llama/Mistral/Qwen2 directory, each rank reading its own shards.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")] = None,
    lr_decay_style: Annotated[Optional[str], typer.Option("--lr-decay-style", help="After warmup: cosine (default), linear, constant or wsd (warmup-stable-decay).")] = None,
    wsd_decay_steps: Annotated[Optional[int], typer.Option("--wsd-decay-steps", help="wsd: steps of the final decay (default: a tenth of --steps).")] = None,
    seq_length: Annotated[Optional[int], typer.Option("--seq-length", help="Tokens per sequence.")] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option("--micro-batch-size", help="Sequences per micro-batch.")] = None,
    global_batch_size: Annotated[Optional[int], typer.Option("--global-batch-size", help="Sequences per optimizer step.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for initialisation and data order.")] = None,
    save_interval: Annotated[Optional[int], typer.Option("--save-interval", help="Checkpoint every N steps (0: at the end).")] = None,
    eval_interval: Annotated[Optional[int], typer.Option("--eval-interval", help="Validation loss every N steps.")] = None,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", help="Validate on this token dataset (PREFIX or PREFIX:WEIGHT; repeat to blend) instead of a split of --data.")] = None,
    eval_mask: Annotated[Optional[list[str]], typer.Option("--eval-mask", help="Static mask store per --eval-data prefix (e.g. PREFIX.mask from rho tokenize --response-key): validate only on its tokens.")] = None,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", help="End after step N with a checkpoint; the LR schedule still spans --steps.")] = None,
    scores: Annotated[Optional[list[str]], typer.Option("--scores", help="Score store (rho score) per --data prefix: selective training.")] = None,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Reference model run online on each step's micro-batches, instead of --scores: a rho checkpoint or a Hugging Face Llama/Mistral/Qwen2 directory with the run's vocabulary.")] = None,
    trace_selection: Annotated[Optional[int], typer.Option("--trace-selection", help="Record the first N steps' samples, losses and kept tokens in RUN/selection_trace/ (for rho analyze context).")] = None,
    select_ratio: Annotated[Optional[str], typer.Option("--select-ratio", help="Train on this fraction of tokens (e.g. 0.6), or move linearly from one fraction to another over the run (1.0:0.6).")] = None,
    select_scope: Annotated[Optional[str], typer.Option("--select-scope", help="sequence (default), microbatch or batch.")] = None,
    select_by: Annotated[Optional[str], typer.Option("--select-by", help="Rank tokens by excess (default, Rho-1), reference, training, entropy or random (the control); A&B keeps tokens both choose, A|B either.")] = None,
    select_after: Annotated[Optional[int], typer.Option("--select-after", help="Train on every token for this many steps before selecting (a warm-up).")] = None,
    mask: Annotated[Optional[list[str]], typer.Option("--mask", help="Static mask store (rho select, or PREFIX.mask from rho tokenize --response-key) per --data prefix: train only on its tokens.")] = None,
    separate_documents: Annotated[Optional[bool], typer.Option("--separate-documents", help="Documents packed into a sequence do not attend to each other (SFT on packed examples; megatron's reset_attention_mask).")] = None,
    pack: Annotated[Optional[str], typer.Option("--pack", help="stream (default: megatron's GPTDataset, documents cut at sequence edges) or whole (whole documents per sequence, padded: SFT).")] = None,
    recompute: Annotated[Optional[str], typer.Option("--recompute", help="Recompute activations in backward: full (whole layers) or selective (core attention); none by default.")] = None,
    sequence_parallel: Annotated[Optional[bool], typer.Option("--sequence-parallel", help="Split norms and the residual stream over the TP ranks along the sequence (TP > 1).")] = None,
    distributed_optimizer: Annotated[Optional[bool], typer.Option("--distributed-optimizer/--no-distributed-optimizer", help="Shard Adam's state and fp32 weights over the data-parallel ranks (default: on for DP > 1 on GPU).")] = None,
    virtual_pp: Annotated[Optional[int], typer.Option("--virtual-pp", help="Virtual pipeline stages per PP rank (interleaved 1F1B; needs --pp > 1).")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16 (dynamic loss scaling).")] = None,
    async_save: Annotated[Optional[bool], typer.Option("--async-save", help="Write checkpoints in the background; latest moves only when a save is complete.")] = None,
    tensorboard: Annotated[Optional[str], typer.Option("--tensorboard", help="Also log the metrics as TensorBoard events in DIR (pip install 'rho\\[tensorboard]').")] = None,
    wandb_project: Annotated[Optional[str], typer.Option("--wandb-project", help="Also log the metrics to this W&B project (pip install 'rho\\[wandb]'; WANDB_MODE=offline works).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any option: train.KEY=VALUE or model.KEY=VALUE.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Reuse a run directory that holds checkpoints (start over).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate config, data and layout, print the plan and a per-rank memory estimate, exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No banner or progress (errors still print).")] = False,
) -> None:
    """Train a causal LM, or a selective one, on megatron-core with TP / PP / DP."""
    from rhocli.core.errors import UsageError
    from rhocli.core.launch import world_from_env
    from rhocli.core.megatron_io import quiet_megatron
    from rhocli.train.run import run_training
    from rhocli.train.spec import build_run_spec, load_run_configs, run_plan

    quiet_megatron()
    flags = {
        "tp": tp, "pp": pp, "dp": dp, "cp": cp, "data": tuple(data) if data else None, "save": save, "steps": steps,
        "epochs": epochs, "separate_documents": separate_documents, "pack": pack,
        "resume": resume, "init": init, "lr": lr,
        "lr_decay_style": lr_decay_style, "wsd_decay_steps": wsd_decay_steps, "seq_length": seq_length, "micro_batch_size": micro_batch_size,
        "global_batch_size": global_batch_size, "seed": seed, "save_interval": save_interval,
        "eval_interval": eval_interval, "eval_data": tuple(eval_data) if eval_data else None,
        "eval_masks": tuple(eval_mask) if eval_mask else None, "stop_after": stop_after,
        "scores": tuple(scores) if scores else None, "reference": reference, "trace_selection": trace_selection, "masks": tuple(mask) if mask else None, **_ratio_schedule(select_ratio),
        "select_scope": select_scope, "select_by": select_by, "select_after": select_after,
        "recompute": recompute, "sequence_parallel": sequence_parallel,
        "distributed_optimizer": distributed_optimizer, "virtual_pp": virtual_pp, "precision": precision,
        "async_save": async_save, "tensorboard": tensorboard, "wandb_project": wandb_project,
    }
    if pack is not None and pack not in ("stream", "whole"):
        raise UsageError(f"--pack: expected stream or whole, got {pack!r}")
    if epochs is not None and steps is not None:
        raise UsageError("--epochs and --steps exclude each other (--epochs sets the steps)")
    if select_scope is not None and select_scope not in ("sequence", "microbatch", "batch"):
        raise UsageError(f"--select-scope: expected sequence, microbatch or batch, got {select_scope!r}")
    if precision is not None and precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"--precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    if lr_decay_style is not None and lr_decay_style not in ("cosine", "linear", "constant", "wsd"):
        raise UsageError(f"--lr-decay-style: expected cosine, linear, constant or wsd, got {lr_decay_style!r}")
    if recompute is not None and recompute not in ("none", "full", "selective"):
        raise UsageError(f"--recompute: expected full, selective or none, got {recompute!r}")
    model_cfg, train_cfg = load_run_configs(config, flags, list(set_ or []))
    spec, world = build_run_spec(model_cfg, train_cfg, config, force=force, world_size=world_from_env())
    if dry_run:
        _print_plan(run_plan(spec, world))
        return
    from rhocli.commands.train_render import TrainRenderer

    run_training(spec, world, force, None if quiet else TrainRenderer)


def _ratio_schedule(text: str | None) -> dict:
    """``--select-ratio 0.6`` or ``1.0:0.6`` (start:end) as the config's keys."""
    from rhocli.core.errors import UsageError

    if text is None:
        return {"select_ratio": None}
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or (len(values) == 2 and not all(0 < v <= 1 for v in values)):
        # one value out of range: the range check's message, as for every option
        raise UsageError(f"--select-ratio {text}: expected a fraction in (0, 1] (0.6), or START:END (1.0:0.6)")
    return {"select_ratio": values[-1], **({"select_ratio_start": values[0]} if len(values) == 2 else {})}


def _datasets(refs) -> str:
    return ", ".join(d["prefix"] + (f":{d['weight']}" if d["weight"] else "") for d in refs)


def _print_plan(plan: dict) -> None:
    from rich.table import Table

    table = Table(title="rho train --dry-run: plan", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    cp = f" x cp {plan['cp']}" if plan.get("cp", 1) > 1 else ""
    table.add_row("layout", f"world {plan['world_size']} = tp {plan['tp']} x pp {plan['pp']}{cp} x dp {plan['dp']}")
    table.add_row("model", f"{plan['architecture']}, {plan['parameters']:,} parameters, "
                           f"{plan['num_layers']} layers ({plan['num_layers'] // plan['pp']} per stage)")
    table.add_row("vocab", f"{plan['vocab_size']} (padded {plan['padded_vocab_size']}, "
                           f"{plan['padded_vocab_size'] // plan['tp']} per TP rank)")
    table.add_row("data", lit(_datasets(plan["datasets"])))
    if plan["eval_datasets"]:
        table.add_row("validation", lit(_datasets(plan["eval_datasets"])))
    table.add_row("batch", f"{plan['global_batch_size']} x {plan['seq_length']} tokens; {plan['num_microbatches']} "
                           f"micro-batches of {plan['micro_batch_size']} per DP rank")
    table.add_row("steps", f"{plan['steps']} ({plan['steps'] * plan['global_batch_size'] * plan['seq_length']:,} tokens)")
    if plan.get("reference"):
        words = {"online": "online (each step's samples, the run's layout)", "samples": "sample store (this run's samples)",
                 "documents": "document stores (each document scored alone)"}
        table.add_row("reference", f"{words[plan['reference']['source']]}: " + lit(plan["reference"]["path"]))
    table.add_row("run dir", lit(plan["run_dir"]) + (" (resume)" if plan["resume"] else ""))
    table.add_row("config hash", plan["config_hash"])
    _memory_rows(table, plan["memory"], plan["pp"], plan["dp"])
    out.print(table)
    out.print("[green]config, data and layout are valid[/]")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _optimizer_state_words(m: dict) -> str:
    main = "fp32 main weights" if m["precision"] != "fp32" else ""
    moments = "Adam moments" if m["optimizer"] == "adam" else ""
    words = " + ".join(w for w in (main, moments) if w) or "none (SGD without momentum)"
    return words + (", sharded over the DP ranks" if m["distributed_optimizer"] else "")


def _memory_rows(table, m: dict, pp: int, dp: int) -> None:
    """``parallel.memory``'s estimate for the most loaded rank, in GiB; labelled an estimate, since it
    leaves out what no config determines (docs/train.md, "Sizing a run")."""
    optimizer = {"adam": "Adam", "sgd": "SGD"}.get(m["optimizer"], m["optimizer"])
    distributed = f", distributed optimizer over dp {dp}" if m["distributed_optimizer"] else ""
    flight = m["micro_batches_in_flight"]
    table.add_row("memory per rank (estimate)", f"pipeline rank {m['pipeline_rank']} of {pp}, the most loaded, on CUDA "
                                                f"devices: {m['precision']}, {optimizer}{distributed}")
    table.add_row("  weights", f"{_gib(m['weights'])} ({m['parameters']:,} parameters)")
    table.add_row("  gradients", f"{_gib(m['gradients'])} (fp32 main_grad buffer)")
    table.add_row("  optimizer state", f"{_gib(m['optimizer_state'])} ({_optimizer_state_words(m)})")
    table.add_row("  activations", f"{_gib(m['activations'])} (recompute {m['recompute']}; {flight} micro-batch"
                                   f"{'es' if flight > 1 else ''} in flight)")
    if m.get("reference"):
        table.add_row("  reference model", f"{_gib(m['reference'])} ({m['reference_parameters']:,} parameters, forward only)")
    table.add_row("  without recompute", _gib(m["activations_no_recompute"]))
    table.add_row("  with full recompute", f"{_gib(m['activations_full_recompute'])} (one layer per checkpoint)")
    table.add_row("  total", f"{_gib(m['total'])} + CUDA context, NCCL buffers, fragmentation (~10-20 % more)")
