"""``rho bench kernel``: forward + backward time and peak extra memory of the fused selective loss,
per implementation, against the eager PyTorch composition it replaces.

Implementations measured (those that can run here):

* ``eager``      log_softmax -> gather -> subtract -> topk -> mask -> backward (PyTorch ops)
* ``megatron``   (GPU) megatron-core's vocab_parallel_cross_entropy, then torch.topk masking
* ``torch``      rho's reference path (cuda_ext.reference), forced with RHO_KERNEL=torch
* ``cpu`` / ``cuda``  rho's fused kernel; ``*-inplace``: backward writes the gradient into the logits

Each (implementation, shape) runs in a fresh subprocess. Peak memory is measured around each timed
call alone: the rise of the peak resident set (CPU; Linux VmHWM, reset through /proc/self/clear_refs)
or of the peak allocated CUDA memory above what was allocated before the call; the largest over the
repetitions is reported. It includes the gradient of the logits unless it is written in place. Time is the median of the repetitions for computing dL/dlogits from logits
(both paths start from the same non-leaf logits; nothing else is timed). On a GPU the device's
copy bandwidth is measured first and the kernel's effective bandwidth counts 6 bytes per bf16 logit
(forward read, backward read + write).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

DEFAULT_SHAPES = ((2048, 32000), (8192, 32000), (32768, 32000))


@dataclasses.dataclass
class KernelResult:
    impl: str
    tokens: int
    vocab: int
    dtype: str
    seconds: float | None
    peak_extra_bytes: int | None
    error: str | None = None


def _child(impl: str, tokens: int, vocab: int, dtype_name: str, reps: int) -> dict:
    """Runs in the subprocess: build inputs, warm up, time, report JSON."""
    import statistics
    import time

    import torch

    cuda = impl in ("cuda", "cuda-inplace", "megatron") or (impl in ("eager", "torch") and os.environ.get("RHO_BENCH_DEVICE") == "cuda")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cpu").manual_seed(0)
    base = (torch.randn(tokens, vocab, generator=g) * 2).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    ref_loss = (torch.rand(tokens, generator=g) * 5).to(device)
    mask = torch.ones(tokens, device=device)
    ratio = 0.6
    if impl in ("cpu", "cpu-inplace", "cuda", "cuda-inplace", "torch"):
        os.environ["RHO_KERNEL"] = impl.split("-")[0]
    inplace = impl.endswith("-inplace")

    if impl == "megatron":
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29555")
        dist.init_process_group("nccl", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)

    def step(logits):
        if impl == "eager":
            lp = torch.log_softmax(logits.float(), dim=-1)
            loss = -lp.gather(-1, targets[:, None]).squeeze(-1)
        elif impl == "megatron":
            loss = vocab_parallel_cross_entropy(logits[:, None, :], targets[:, None]).squeeze(1)
        if impl in ("eager", "megatron"):
            excess = loss.detach() - ref_loss
            k = int(ratio * tokens + 0.5)
            kept = torch.zeros(tokens, dtype=torch.bool, device=device)
            kept[torch.topk(excess, k).indices] = True
            objective = (loss * kept).sum() / kept.sum().clamp(min=1)
        else:
            from cuda_ext import selective_loss

            objective = selective_loss(logits, targets, ref_loss, mask, ratio, inplace_backward=inplace).mean_kept_loss()
        return torch.autograd.grad(objective, logits)[0]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Inputs as a model would hand them over: a non-leaf tensor requiring grad.
    leaf = base.requires_grad_()
    times, peaks = [], []
    for i in range(reps + 1):
        work = leaf * 1.0  # fresh non-leaf logits, as a model's output layer hands them over; not timed
        sync()
        before = _memory_mark(device)
        t0 = time.perf_counter()
        grad = step(work)
        sync()
        elapsed = time.perf_counter() - t0
        if i:  # the first run is warm-up (allocator, extension load)
            times.append(elapsed)
            peaks.append(_memory_peak_since(device, before))
        del grad, work
    return {"seconds": statistics.median(times), "peak_extra_bytes": int(max(peaks))}


def _memory_mark(device) -> int:
    """Current memory, after resetting the peak counter (CPU: VmHWM via /proc/self/clear_refs)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (Linux >= 4.0)
    return _proc_status_kb("VmRSS") * 1024


def _memory_peak_since(device, before: int) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - before
    return max(0, _proc_status_kb("VmHWM") * 1024 - before)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(impl: str, tokens: int, vocab: int, dtype: str, reps: int, timeout: float = 1800) -> KernelResult:
    code = (
        "import json,sys; from rhocli.bench.kernel import _child; "
        f"print('RESULT', json.dumps(_child({impl!r}, {tokens}, {vocab}, {dtype!r}, {reps})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            data = json.loads(line[len("RESULT "):])
            return KernelResult(impl, tokens, vocab, dtype, data["seconds"], data["peak_extra_bytes"])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return KernelResult(impl, tokens, vocab, dtype, None, None, error=tail[:200])


def copy_bandwidth_gbs() -> float | None:
    """Device-to-device copy bandwidth (read + write bytes per second), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (start.elapsed_time(end) / 1000) / 1e9


def available_impls() -> list[str]:
    import shutil

    import torch

    impls = ["eager", "torch"]
    if shutil.which("c++") or shutil.which("g++"):
        impls += ["cpu", "cpu-inplace"]
    if torch.cuda.is_available():
        impls += ["megatron", "cuda", "cuda-inplace"]
    return impls
