"""The fused selective loss against independent ground truth: an oracle written here from
torch.nn.functional.cross_entropy (float64), a top-k by Python's own sort and autograd (it shares no
code with cuda_ext, so the ``RHO_KERNEL=torch`` path, which runs the reference's building blocks, is
checked against something else than itself); autograd's gradcheck and torch.library's opcheck. Each
available implementation (torch reference path, C++ CPU kernel) is forced in turn, and the reference
(cuda_ext's spec) is checked against the oracle too."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from cuda_ext import dispatch, selective_loss, selective_loss_reference, selection_k

HAS_CXX = bool(shutil.which("c++") or shutil.which("g++"))
IMPLS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler"))]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    monkeypatch.setenv("RHO_KERNEL", request.param)
    return request.param


def _inputs(tokens, vocab, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g) * scale).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    ref_loss = torch.rand(tokens, generator=g) * 8
    mask = (torch.rand(tokens, generator=g) > 0.2).float()
    return logits, targets, ref_loss, mask


class Oracle:
    """The selective loss from its definition (docs/kernel.md), in float64, with no cuda_ext code."""

    def __init__(self, logits, targets, ref_loss, mask, ratio, segment_len=None):
        z = logits.detach().double().requires_grad_()
        self.loss = F.cross_entropy(z, targets, reduction="none")  # [tokens], float64
        excess = (self.loss.detach() - ref_loss.double()).tolist()
        n = len(excess)
        seg = segment_len or n
        self.kept = torch.zeros(n, dtype=torch.bool)
        for start in range(0, n, seg):
            candidates = [i for i in range(start, start + seg) if mask[i] > 0]
            k = int(math.floor(ratio * len(candidates) + 0.5))
            # larger excess first, then the lower index; NaN below every number
            order = sorted(candidates, key=lambda i: (math.inf if math.isnan(excess[i]) else -excess[i], i))
            self.kept[order[:k]] = True
        self.n_kept = int(self.kept.sum())
        ((self.loss * self.kept).sum() / max(self.n_kept, 1)).backward()
        self.grad = z.grad
        self.excess = torch.tensor(excess, dtype=torch.float64)


def _run(fn, logits, *args, **kwargs):
    z = logits.detach().clone().requires_grad_()
    out = fn(z, *args, **kwargs)
    out.mean_kept_loss().backward()
    return out, z.grad


@pytest.mark.parametrize("tokens,vocab", [(1, 1), (7, 3), (4099, 1), (7, 32000), (33, 50257), (4099, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_reference(impl, tokens, vocab, dtype):
    if impl == "torch" and dtype == torch.float16 and tokens * vocab > 10**6:
        pytest.skip("reference path in fp16 on a large shape: covered by the float32 case")
    logits, targets, ref_loss, mask = _inputs(tokens, vocab, dtype, seed=tokens + vocab)
    seg = 1 if tokens in (1, 7) else None
    out, grad = _run(selective_loss, logits, targets, ref_loss, mask, 0.6, seg)
    oracle = Oracle(logits, targets, ref_loss, mask, 0.6, seg)  # from the same (rounded) logits
    tol = TOL[dtype]
    assert out.loss.dtype == torch.float32
    # loss from the same (rounded) logits: only accumulation order differs
    assert torch.allclose(out.loss.double(), oracle.loss.detach(), rtol=tol, atol=tol)
    # selection may differ only where two excess values are within rounding of each other: at most a
    # swapped pair at the k-th boundary, whose excesses agree within the loss tolerance
    mismatch = out.kept != oracle.kept
    if mismatch.any():
        excess = oracle.excess[mismatch]
        assert excess.numel() == 2 and (excess.max() - excess.min()) <= 2 * tol * (1 + excess.abs().max())
    assert int(out.n_kept) == oracle.n_kept
    assert grad.dtype == dtype
    if not mismatch.any():
        assert torch.allclose(grad.double(), oracle.grad, rtol=tol, atol=tol / max(1, oracle.n_kept) + tol * 1e-2)


@pytest.mark.parametrize("segment_len", [None, 5, 1])
def test_reference_is_the_definition(segment_len):
    """cuda_ext's float64 spec equals the oracle: loss, selection (NaN and ties included), gradient."""
    logits, targets, ref_loss, mask = _inputs(40, 23, torch.float64, seed=12)
    ref_loss[3] = float("nan")
    ref_loss[10:15] = 0.0
    logits[10:15] = logits[10]  # five identical rows, equal reference: exact ties in excess
    targets[10:15] = targets[10]
    out, grad = _run(selective_loss_reference, logits, targets, ref_loss, mask, 0.45, segment_len)
    oracle = Oracle(logits, targets, ref_loss, mask, 0.45, segment_len)
    assert torch.allclose(out.loss.detach(), oracle.loss.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(out.kept, oracle.kept) and int(out.n_kept) == oracle.n_kept
    assert torch.allclose(grad, oracle.grad, rtol=1e-10, atol=1e-12)


def test_ratio_one_is_plain_cross_entropy(impl):
    logits, targets, _, mask = _inputs(257, 1000, seed=3)
    ref_loss = torch.randn(257)
    out, grad = _run(selective_loss, logits, targets, ref_loss, mask, 1.0, None)
    z = logits.clone().requires_grad_()
    per_token = F.cross_entropy(z, targets, reduction="none")
    expected = (per_token * mask).sum() / mask.sum()
    expected.backward()
    assert out.kept.equal(mask > 0)
    assert torch.allclose(out.mean_kept_loss(), expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out.loss, per_token.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, z.grad, rtol=1e-5, atol=1e-7)


def test_ratio_zero_keeps_nothing_and_gives_zero_gradient(impl):
    logits, targets, ref_loss, mask = _inputs(64, 100, seed=4)
    out, grad = _run(selective_loss, logits, targets, ref_loss, mask, 0.0, 16)
    assert int(out.n_kept) == 0 and not out.kept.any()
    assert out.mean_kept_loss().item() == 0.0
    assert torch.isfinite(grad).all() and (grad == 0).all()


def test_masked_tokens_are_never_kept_or_counted(impl):
    logits, targets, _, _ = _inputs(40, 50, seed=5)
    ref_loss = torch.full((40,), -100.0)  # huge excess everywhere
    mask = torch.zeros(40)
    mask[::4] = 1
    out, grad = _run(selective_loss, logits, targets, ref_loss, mask, 1.0, None)
    assert out.kept.equal(mask > 0) and int(out.n_kept) == 10
    assert (grad[mask == 0] == 0).all()


def test_ties_lower_index_wins_and_rounding(impl):
    # identical rows -> identical losses; with equal reference losses all excesses tie exactly
    row = torch.randn(1, 30)
    logits = row.repeat(10, 1)
    targets = torch.full((10,), 7)
    out = selective_loss(logits, targets, torch.zeros(10), torch.ones(10), 0.35, None)
    # k = floor(0.35 * 10 + 0.5) = 4: the first four indices win the tie
    assert selection_k(10, 0.35) == 4
    assert out.kept.tolist() == [True] * 4 + [False] * 6
    # per-sequence scope: 2 segments of 5 -> k = floor(0.35 * 5 + 0.5) = 2 each
    out = selective_loss(logits, targets, torch.zeros(10), torch.ones(10), 0.35, 5)
    assert out.kept.tolist() == [True, True, False, False, False] * 2


def test_selection_takes_the_largest_excess_per_segment(impl):
    logits, targets, _, _ = _inputs(12, 20, seed=6)
    loss = F.cross_entropy(logits, targets, reduction="none")
    ref_loss = loss - torch.arange(12, dtype=torch.float32)  # excess = 0, 1, 2, ... 11
    out = selective_loss(logits, targets, ref_loss, torch.ones(12), 0.5, 6)
    assert out.kept.tolist() == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3


def test_nan_excess_ranks_last(impl):
    logits, targets, _, _ = _inputs(6, 10, seed=7)
    ref_loss = torch.tensor([float("nan"), 0.0, float("nan"), 0.0, 0.0, 0.0])
    out = selective_loss(logits, targets, ref_loss, torch.ones(6), 4 / 6, None)
    assert not out.kept[0] and not out.kept[2] and int(out.n_kept) == 4


def test_inplace_backward_matches(impl):
    logits, targets, ref_loss, mask = _inputs(65, 301, seed=8)
    _, grad = _run(selective_loss, logits, targets, ref_loss, mask, 0.6, 13)
    z = logits.clone().requires_grad_()
    work = z * 1.0  # a non-leaf the op may overwrite
    selective_loss(work, targets, ref_loss, mask, 0.6, 13, inplace_backward=True).mean_kept_loss().backward()
    assert torch.allclose(z.grad, grad, rtol=1e-6, atol=1e-8)


def test_gradcheck_float64():
    logits, targets, ref_loss, mask = _inputs(6, 5, torch.float64, seed=9)

    def objective(z):
        return selective_loss(z, targets, ref_loss.double(), mask, 0.5, 3).mean_kept_loss()

    assert torch.autograd.gradcheck(objective, (logits.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl_name", IMPLS)
def test_opcheck(impl_name, monkeypatch):
    from cuda_ext import ops

    monkeypatch.setenv("RHO_KERNEL", impl_name)
    logits, targets, ref_loss, mask = _inputs(9, 17, seed=10)
    lse = torch.logsumexp(logits, -1)
    g = torch.rand(9)
    torch.library.opcheck(ops.row_stats, (logits, targets, 0))
    torch.library.opcheck(ops.grad_logits, (logits, targets, 0, lse, g))
    torch.library.opcheck(ops.topk_mask, (torch.randn(9), mask > 0, 0.5, 3))
    torch.library.opcheck(ops.cross_entropy, (logits.clone().requires_grad_(), targets))
    torch.library.opcheck(ops.grad_logits_, (logits.clone(), targets, 0, lse, g))


def test_compiles_with_torch_compile(monkeypatch):
    monkeypatch.setenv("RHO_KERNEL", "torch")
    logits, targets, ref_loss, mask = _inputs(8, 11, seed=11)

    @torch.compile(backend="eager", fullgraph=False)
    def f(z):
        from cuda_ext import ops

        loss, _ = ops.cross_entropy(z, targets)
        return loss.sum()

    z = logits.clone().requires_grad_()
    f(z).backward()
    zz = logits.clone().requires_grad_()
    F.cross_entropy(zz, targets, reduction="sum").backward()
    assert torch.allclose(z.grad, zz.grad, atol=1e-6)


def test_forced_unavailable_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RHO_KERNEL", "cuda")
    logits, targets, ref_loss, mask = _inputs(4, 5)
    with pytest.raises(dispatch.KernelUnavailableError, match="RHO_KERNEL=cuda cannot run: cuda: the logits are on cpu"):
        selective_loss(logits, targets, ref_loss, mask, 0.5)
    monkeypatch.setenv("RHO_KERNEL", "gpu")
    with pytest.raises(dispatch.KernelUnavailableError, match="expected auto, torch, cpu or cuda"):
        selective_loss(logits, targets, ref_loss, mask, 0.5)


def test_auto_choice_is_reported(monkeypatch):
    monkeypatch.delenv("RHO_KERNEL", raising=False)
    logits, targets, ref_loss, mask = _inputs(4, 5)
    selective_loss(logits, targets, ref_loss, mask, 0.5)
    choice = dispatch.last_choice()["cpu/torch.float32"]
    assert choice.backend == ("cpu" if HAS_CXX else "torch")


def test_bad_arguments():
    logits, targets, ref_loss, mask = _inputs(6, 5)
    with pytest.raises(ValueError, match="ratio must be in"):
        selective_loss(logits, targets, ref_loss, mask, 1.5)
    with pytest.raises(ValueError, match="multiple of segment_len"):
        selective_loss(logits, targets, ref_loss, mask, 0.5, 4)
    assert math.isclose(selection_k(7, 0.5), 4)  # 3.5 rounds half up


@pytest.mark.skipif(not shutil.which("nvcc"), reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles(tmp_path, arch):
    """The CUDA kernels compile on a CPU-only machine (running them needs a GPU: the gpu tests)."""
    import subprocess

    from cuda_ext.dispatch import CSRC

    proc = subprocess.run(
        ["nvcc", "-c", "-std=c++17", f"-arch={arch}", "-O3", "--use_fast_math",
         str(CSRC / "selective_loss_cuda_kernels.cu"), "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 0


def _nvcc_include_flags() -> list[str]:
    """The CUDA include flags nvcc itself uses (read from its dry run, so a wrapper script on PATH
    or a non-standard install is found as nvcc finds it)."""
    import shlex
    import subprocess

    dry = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True, timeout=60)
    flags = []
    for line in dry.stderr.splitlines():
        if line.startswith(("#$ INCLUDES=", "#$ SYSTEM_INCLUDES=")):
            flags += shlex.split(line[3:].split("=", 1)[1])
    return flags


@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("g++")), reason="nvcc and g++ are needed")
def test_cuda_glue_compiles_with_an_nvcc_only_toolkit(tmp_path):
    """The C++ glue of the CUDA extension needs only the CUDA runtime headers an nvcc-only toolkit
    has (no cuBLAS/cuSPARSE, which ATen/cuda/CUDAContext.h pulls in): a syntax check against torch's
    headers and nvcc's own include path. A CPU build of torch lacks one generated header of c10/cuda
    (its build options); an empty stand-in takes its place there."""
    import subprocess
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    from cuda_ext.dispatch import CSRC

    stand_in = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#pragma once\n")
    includes = [f"-I{p}" for p in include_paths()] + _nvcc_include_flags()
    proc = subprocess.run(
        ["g++", "-std=c++20", "-fsyntax-only", *includes, f"-I{sysconfig.get_paths()['include']}",
         "-idirafter", str(tmp_path), "-DTORCH_EXTENSION_NAME=rho_glue_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
         str(CSRC / "selective_loss_cuda.cpp")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_dead_builders_lock_is_removed(tmp_path):
    """A builder killed mid-build leaves torch's ``lock`` in the build directory, and torch's
    ``load`` then waits on it forever. A fresh process must load the (already built) CPU kernel
    anyway, and remove the lock."""
    import subprocess
    import sys

    dispatch.extension("cpu")  # built (cached) before the lock is planted
    lock = dispatch.build_directory("rho_selective_loss_cpu") / "lock"
    lock.touch()
    try:
        proc = subprocess.run([sys.executable, "-c", "from cuda_ext import dispatch; dispatch.extension('cpu')"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "left by a kernel build that did not finish" in proc.stderr
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,vocab,seg", [(7, 3, 7), (4099, 32000, None), (64, 50257, 16)])
def test_cuda_kernel_matches_reference(monkeypatch, dtype, tokens, vocab, seg):
    monkeypatch.setenv("RHO_KERNEL", "cuda")
    logits, targets, ref_loss, mask = _inputs(tokens, vocab, dtype, seed=tokens)
    dev = torch.device("cuda")
    out, grad = _run(selective_loss, logits.to(dev), targets.to(dev), ref_loss.to(dev), mask.to(dev), 0.6, seg)
    ref, ref_grad = _run(selective_loss_reference, logits.double(), targets, ref_loss.double(), mask, 0.6, seg)
    tol = TOL[dtype]
    assert torch.allclose(out.loss.double().cpu(), ref.loss, rtol=tol, atol=tol)
    assert int(out.n_kept) == int(ref.n_kept)
    if torch.equal(out.kept.cpu(), ref.kept):
        assert torch.allclose(grad.double().cpu(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_rows_give_torchs_logsumexp(impl, dtype):
    """A row holding +inf has logsumexp +inf, one holding a NaN has NaN (torch.logsumexp, and the
    CUDA kernel): the CPU kernel's vectorised max and clamped exp must not hide them. The rows are
    wider than one of the kernel's 512-wide chunks, with the odd value in the second chunk."""
    from cuda_ext import ops

    vocab, inf, nan = 1100, float("inf"), float("nan")
    logits = torch.randn(6, vocab).to(dtype)
    logits[1, 700] = inf
    logits[2, 900] = nan
    logits[3] = -inf
    logits[4, 600], logits[4, 601] = inf, nan
    logits[5, 3] = -inf
    lse, _ = ops.row_stats(logits, torch.zeros(6, dtype=torch.long), 0)
    expected = torch.logsumexp(logits.float(), dim=-1)
    assert torch.equal(torch.isnan(lse), torch.isnan(expected)), (lse, expected)
    finite = ~torch.isnan(expected)
    assert torch.equal(torch.isinf(lse[finite]), torch.isinf(expected[finite]))
    both_finite = torch.isfinite(expected)
    torch.testing.assert_close(lse[both_finite].float(), expected[both_finite], rtol=1e-5, atol=1e-5)
    assert lse[1] == inf and torch.isnan(lse[2]) and lse[3] == -inf and torch.isnan(lse[4])


def test_compiled_kernels_get_fp32_contiguous_vectors(monkeypatch):
    """What the CUDA glue demands (it checks; the CPU glue converts): ``loss.sum().backward()`` hands
    the backward a stride-0 grad_loss, and a float64 excess must reach the top-k as fp32. A spy
    extension records what the ops pass; the results must still equal the reference."""
    from cuda_ext import ops, reference

    seen = []

    class Spy:
        def grad_logits(self, logits, targets, vocab_start, lse, grad_loss, inplace):
            seen.extend([lse, grad_loss])
            grad = reference.grad_logits_reference(logits, targets, vocab_start, lse, grad_loss)
            return logits.copy_(grad) if inplace else grad

        def row_stats(self, logits, targets, vocab_start):
            return reference.row_stats_reference(logits, targets, vocab_start)

        def topk_mask(self, excess, candidate, ratio, seg):
            seen.extend([excess, candidate])
            return reference.topk_mask_reference(excess, candidate, ratio, seg)

    monkeypatch.setattr(dispatch, "choose", lambda device, dtype: dispatch.Choice("cuda", "spy"))
    monkeypatch.setattr(dispatch, "extension", lambda backend: Spy())
    logits = torch.randn(6, 11, requires_grad=True)
    targets = torch.randint(0, 11, (6,))
    loss, _ = ops.cross_entropy(logits, targets)
    loss.sum().backward()
    expected = torch.softmax(logits.detach(), -1) - F.one_hot(targets, 11)
    torch.testing.assert_close(logits.grad, expected)
    excess = torch.randn(8, dtype=torch.float64)
    kept = ops.topk_mask(excess, torch.ones(8, dtype=torch.bool), 0.5, 4)
    assert kept.sum() == 4
    assert seen and all(t.dtype in (torch.float32, torch.bool) and t.is_contiguous() and t.stride() == (1,) for t in seen)
