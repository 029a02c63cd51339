"""Build rho's kernels ahead of time (otherwise they are built on first use).

    python -m cuda_ext.build          # the CPU kernel, and the CUDA kernel when CUDA is available
"""

from __future__ import annotations

import sys

import torch

from cuda_ext.dispatch import KernelUnavailableError, extension


def main() -> int:
    status = 0
    for backend in ("cpu", "cuda"):
        if backend == "cuda" and not torch.cuda.is_available():
            print("cuda: skipped (CUDA is not available)")
            continue
        try:
            module = extension(backend)
            print(f"{backend}: built {module.__file__}")
        except KernelUnavailableError as err:
            print(f"{backend}: {err}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
