"""Which implementation runs the fused op: ``cuda`` -> ``cpu`` -> ``torch``.

``auto`` (default) picks, for the device of the logits, the fastest implementation that can run:
the CUDA extension for CUDA tensors, the C++ CPU extension for CPU tensors, else the PyTorch
reference. ``RHO_KERNEL=torch|cpu|cuda`` forces one; a forced implementation that cannot run raises
``KernelUnavailableError`` listing why. The choice is logged once per device type (logger
``rho.kernel``) and can be read with ``last_choice``.

The extensions are compiled from ``cuda_ext/csrc`` with torch's JIT builder on first use (tens of
seconds, cached under ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``: ``build_directory``); ``python -m
cuda_ext.build`` builds them ahead of time. float64 inputs always use the reference (the kernels
accumulate in fp32).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import shutil
import sys
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


def build_directory(name: str) -> Path:
    """Where extension ``name`` is built and cached: ``$TORCH_EXTENSIONS_DIR`` (else torch's
    ``~/.cache/torch_extensions``) / one folder per Python, torch build and rho source tree / ``name``.
    rho names it itself, rather than leaving it to torch, to know where torch's build lock lies; two
    checkouts of rho (a CI clone beside a working copy) get their own, since torch rebuilds whenever
    the source paths in its build file change."""
    import hashlib

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    tree = hashlib.sha1(str(CSRC).encode()).hexdigest()[:8]
    return root / f"rho-py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{tree}" / name


def _ensure_ninja() -> None:
    """torch's JIT builder runs ``ninja`` from PATH; the ``ninja`` wheel (a dependency) installs it
    next to the interpreter, which is not on PATH when a venv's ``rho`` runs unactivated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        raise RuntimeError("ninja is not installed (pip install ninja)") from None
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _load(name: str, **kwargs) -> object:
    """torch's ``load`` for extension ``name``, one builder at a time per machine and never stuck on
    a dead builder's lock.

    torch guards a build with a ``lock`` file it deletes when the build ends; a builder killed
    mid-build leaves it, and every later ``load`` waits on it forever. rho holds an flock (released
    by the kernel when its holder dies, however it dies) around every ``load`` of its builds, so a
    ``lock`` file found while holding it was left by a dead builder and is removed."""
    from torch.utils.cpp_extension import load

    _ensure_ninja()
    build_dir = build_directory(name)
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{name}.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # waits for a live builder (another rank) to finish
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("rho: removed %s, left by a kernel build that did not finish", stale)
            stale.unlink(missing_ok=True)
        return load(name=name, build_directory=str(build_dir), verbose=False, **kwargs)


class RegisteredOps:
    """A kernel library registered as torch operators (``TORCH_LIBRARY(namespace, ...)``): its
    functions are ``torch.ops.<namespace>.<name>``; ``__file__`` is the shared library loaded."""

    def __init__(self, path: str, namespace: str):
        self.__file__ = path
        self._ops = getattr(torch.ops, namespace)

    def __getattr__(self, name: str):
        return getattr(self._ops, name)


def _compile(name: str) -> object:
    if name == "cpu":
        if not (shutil.which("c++") or shutil.which("g++")):
            raise RuntimeError("no C++ compiler (c++/g++) on PATH")
        logger.info("rho: building or loading the CPU selective-loss kernel (cached after the first build)")
        path = _load(
            "rho_selective_loss_cpu",
            sources=[str(CSRC / "selective_loss_cpu.cpp")],
            # -fopenmp: at::parallel_for is an inline OpenMP loop, serial without it;
            # -march=native: the build is per machine (JIT cache), so use its widest vectors.
            extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,  # a plain library that registers torch.ops.rho_cpu (the .cpp says why)
        )
        return RegisteredOps(path, "rho_cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    if not shutil.which("nvcc") and not os.environ.get("CUDA_HOME"):
        raise RuntimeError("nvcc is not on PATH and CUDA_HOME is not set")
    logger.info("rho: building or loading the CUDA selective-loss kernel (cached after the first build)")
    # torch picks the C++ standard its headers need (C++20 for torch 2.13) and the GPU's arch
    # (TORCH_CUDA_ARCH_LIST to build for others)
    return _load(
        "rho_selective_loss_cuda",
        sources=[str(CSRC / "selective_loss_cuda.cpp"), str(CSRC / "selective_loss_cuda_kernels.cu")],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math"],
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
        # on a GPU the PyTorch loss materialises fp32 copies of the logits: a run that falls back
        # to it silently would be slow and memory-hungry for no visible reason
        slow = device.type == "cuda" and choice.backend == "torch" and want == "auto"
        logger.log(logging.WARNING if slow else logging.INFO, "rho selective loss on %s %s: %s kernel (%s)",
                   device.type, dtype, choice.backend, choice.reason)
    return choice


def extension(backend: str):
    return _build(backend)


def last_choice() -> dict[str, Choice]:
    """The choices made so far, per 'device/dtype' (for banners)."""
    return dict(_announced)
