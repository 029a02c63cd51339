"""Rank 0's view of ``rho train``: a start-up banner, Rich progress (step, loss, lr, grad norm,
tokens/s, ETA), checkpoint and evaluation lines. Without a terminal: one plain line per log interval
(at most one per 10 s) so cluster logs stay readable."""

from __future__ import annotations

import time
from typing import Any

from rhocli.commands.console import human_count, lit, out


class TrainRenderer:
    def __init__(self) -> None:
        self._progress = None
        self._task = None
        self._last_line = 0.0
        self._interactive = out.is_terminal

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        getattr(self, f"_on_{kind}", lambda p: None)(payload)

    def _on_start(self, p: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(title="rho train", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in banner_rows(p):
            table.add_row(key, lit(value))
        out.print(table)
        if self._interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  gnorm {task.fields[gnorm]}  {task.fields[tps]} tok/s"),
                TimeRemainingColumn(), console=out, transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=p["total_steps"], completed=p["start_step"], loss="-", lr="-", gnorm="-", tps="-"
            )

    def _on_resumed(self, p: dict[str, Any]) -> None:
        out.print(f"resumed from {lit(p['path'])} at step {p['step']}")

    def _on_initialized(self, p: dict[str, Any]) -> None:
        out.print(f"initialised weights from {lit(p['path'])}")

    def _on_step(self, m: dict[str, Any]) -> None:
        fields = dict(loss=_num(m["loss"], ".4f"), lr=f"{m['lr']:.2e}", gnorm=_num(m["grad_norm"], ".3f"),
                      tps=human_count(m["tokens_per_s"]))
        if m.get("skipped"):
            self._print(f"step {m['step']}: no token kept in this batch (mask or selection); optimizer step skipped")
        if self._progress is not None:
            self._progress.update(self._task, completed=m["step"], **fields)
        elif time.monotonic() - self._last_line >= 10 or "valid_loss" in m:
            self._last_line = time.monotonic()
            extra = ""
            if "kept_fraction" in m and "mean_excess" in m:
                extra = (f"  kept {_num(m['kept_fraction'], '.2f')}  excess {_num(m['mean_excess'], '.3f')}  "
                         f"kept/dropped {_num(m['kept_loss'], '.3f')}/{_num(m['dropped_loss'], '.3f')}  "
                         f"ref {_num(m['ref_loss'], '.3f')}")
            out.print(f"step {m['step']}  loss {fields['loss']}  lr {fields['lr']}  gnorm {fields['gnorm']}  {fields['tps']} tok/s{extra}")
        if m.get("valid_loss") is not None:
            self._print(f"step {m['step']}: validation loss {m['valid_loss']:.4f}")

    def _on_eval(self, p: dict[str, Any]) -> None:
        if p.get("valid_loss") is not None:
            self._print(f"step {p['step']}: validation loss {p['valid_loss']:.4f}")

    def _on_checkpoint(self, p: dict[str, Any]) -> None:
        self._print(f"saved checkpoint {lit(p['path'])}")

    def _on_done(self, p: dict[str, Any]) -> None:
        self.close()
        valid = f", validation loss {p['valid_loss']:.4f}" if p.get("valid_loss") is not None else ""
        out.print(f"[green]done[/]: {p['step']} steps{valid}; run directory {lit(p['run_dir'])}")

    def _print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            out.print(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _num(value, spec: str) -> str:
    """A metric for the progress line; "-" for none (a skipped step has no loss or gradient norm)."""
    return "-" if value is None or value != value else format(value, spec)


def _selection_row(sel: dict[str, Any]) -> str:
    """"top 60% by excess per sequence; scores c.ref", with the warm-up and schedule when there are."""
    ratio = f"{sel['ratio_start']:.0%} -> {sel['ratio']:.0%}" if sel.get("ratio_start") is not None else f"{sel['ratio']:.0%}"
    row = f"top {ratio} by {sel.get('score', 'excess')} per {sel['scope']}"
    if sel.get("after"):
        row += f" after {sel['after']} steps on every token"
    ref = sel.get("reference")
    if not ref:
        return row
    return row + {
        "online": f"; reference online: {ref['path']} ({ref['layers']} layers, hidden {ref['hidden']}), each step's samples",
        "samples": f"; reference losses of this run's samples: {ref['path']}",
        "documents": f"; reference losses per document (scored alone): {ref['path']}",
    }[ref["source"]]


def banner_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    """The start-up banner's rows from the engine's ``Trainer.banner()`` data."""
    opt, sel = p["optimizer"], p["selection"]
    backend = p["backend"] + (f" + CPU shims: {', '.join(p['cpu_shims'])}" if p["cpu_shims"] else "")
    data = ", ".join(d["prefix"] + (f":{d['weight']}" if d["weight"] is not None else "") for d in p["datasets"])
    selection = (_selection_row(sel) if sel else "all tokens (causal LM)")
    return [
        ("layout", f"tp={p['tp']} pp={p['pp']}" + (f" cp={p['cp']}" if p.get("cp", 1) > 1 else "")
                   + f" dp={p['dp']} ({p['backend']})"),
        ("backend", backend),
        ("layers", f"{p['layer_spec']} layer spec, {p['attention']} attention; loss kernel {p['loss_kernel']}"),
        ("parameters", f"{human_count(p['parameters'])} ({p['parameters']:,})"),
        ("vocab", f"{p['vocab_size']} (padded {p['padded_vocab_size']})"),
        ("precision", p["precision"]),
        ("data", data),
        ("selection", selection),
        ("batch", f"{p['global_batch_size']} x {p['seq_length']} tokens = {p['num_microbatches']} micro-batches of "
                  f"{p['micro_batch_size']} per DP rank"),
        ("optimizer", f"{opt['name']} ({opt['kind']}), lr {opt['lr']} warmup {opt['warmup_steps']} {opt['decay_style']} "
                      f"to {opt['min_lr']}, clip {opt['clip_grad']}"),
        ("steps", f"{p['start_step']} -> {p['total_steps']}"),
        ("config hash", p["config_hash"]),
        ("run dir", p["run_dir"]),
    ]
