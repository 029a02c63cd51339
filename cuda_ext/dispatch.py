"""Which implementation runs the fused op: ``cuda`` -> ``cpu`` -> ``torch``.

``auto`` (default) picks, for the device of the logits, the fastest implementation that can run:
the CUDA extension for CUDA tensors, the C++ CPU extension for CPU tensors, else the PyTorch
reference. ``RHO_KERNEL=torch|cpu|cuda`` forces one; a forced implementation that cannot run raises
``KernelUnavailableError`` listing why. The choice is logged once per device type (logger
``rho.kernel``) and can be read with ``last_choice``.

The extensions are compiled from ``cuda_ext/csrc`` with torch's JIT builder on first use (tens of
seconds, cached in ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``); ``python -m
cuda_ext.build`` builds them ahead of time. float64 inputs always use the reference (the kernels
accumulate in fp32).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from cuda_ext.errors import KernelUnavailableError

logger = logging.getLogger("rho.kernel")
CSRC = Path(__file__).resolve().parent / "csrc"
BACKENDS = ("cuda", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


_lock = threading.Lock()
_extensions: dict[str, object] = {}
_failures: dict[str, str] = {}
_announced: dict[str, Choice] = {}


def _build(name: str) -> object:
    """Load (building if needed) extension ``name`` ('cpu' or 'cuda'); raises with the reason."""
    with _lock:
        if name in _extensions:
            return _extensions[name]
        if name in _failures:
            raise KernelUnavailableError(_failures[name])
        try:
            _extensions[name] = _compile(name)
            return _extensions[name]
        except Exception as err:  # compiler missing, build error: remembered, reported once
            _failures[name] = f"the {name} extension could not be built: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"
            raise KernelUnavailableError(_failures[name]) from err


def _compile(name: str) -> object:
    from torch.utils.cpp_extension import load

    if name == "cpu":
        if not (shutil.which("c++") or shutil.which("g++")):
            raise RuntimeError("no C++ compiler (c++/g++) on PATH")
        logger.info("rho: building or loading the CPU selective-loss kernel (cached after the first build)")
        return load(
            name="rho_selective_loss_cpu",
            sources=[str(CSRC / "selective_loss_cpu.cpp")],
            # -fopenmp: at::parallel_for is an inline OpenMP loop, serial without it;
            # -march=native: the build is per machine (JIT cache), so use its widest vectors.
            extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    if not shutil.which("nvcc") and not os.environ.get("CUDA_HOME"):
        raise RuntimeError("nvcc is not on PATH and CUDA_HOME is not set")
    logger.info("rho: building or loading the CUDA selective-loss kernel (cached after the first build)")
    return load(
        name="rho_selective_loss_cuda",
        sources=[str(CSRC / "selective_loss_cuda.cpp"), str(CSRC / "selective_loss_cuda_kernels.cu")],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-std=c++17"],
        verbose=False,
    )


def requested() -> str:
    value = os.environ.get("RHO_KERNEL", "auto").strip().lower() or "auto"
    if value not in BACKENDS + ("auto",):
        raise KernelUnavailableError(f"RHO_KERNEL={value!r}: expected auto, torch, cpu or cuda")
    return value


def choose(device: torch.device, dtype: torch.dtype) -> Choice:
    """The implementation for tensors on ``device`` with ``dtype`` (see module docstring)."""
    want = requested()
    reasons: list[str] = []
    candidates = BACKENDS if want == "auto" else (want,)
    for backend in candidates:
        if backend == "torch":
            choice = Choice("torch", "forced by RHO_KERNEL" if want == "torch" else "; ".join(reasons) or "reference")
            break
        if backend != device.type:
            reasons.append(f"{backend}: the logits are on {device.type}")
            continue
        if dtype not in KERNEL_DTYPES:
            reasons.append(f"{backend}: {dtype} is not a kernel dtype (float32, bfloat16, float16)")
            continue
        try:
            _build(backend)
        except KernelUnavailableError as err:
            reasons.append(str(err))
            continue
        choice = Choice(backend, "forced by RHO_KERNEL" if want != "auto" else f"fastest available for {device.type}")
        break
    else:
        raise KernelUnavailableError(f"RHO_KERNEL={want} cannot run: " + "; ".join(reasons))
    key = f"{device.type}/{dtype}"
    if _announced.get(key) != choice:
        _announced[key] = choice
        logger.info("rho selective loss on %s %s: %s kernel (%s)", device.type, dtype, choice.backend, choice.reason)
    return choice


def extension(backend: str):
    return _build(backend)


def last_choice() -> dict[str, Choice]:
    """The choices made so far, per 'device/dtype' (for banners)."""
    return dict(_announced)
