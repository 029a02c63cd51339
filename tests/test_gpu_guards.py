"""The GPU path's guards, checked on CPU with CUDA's answers stood in: what a machine with too few
GPUs is told, and that a CUDA run falling back to the PyTorch loss says so."""

from __future__ import annotations

import logging

import pytest
import torch


def _pretend_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_a_local_rank_without_a_gpu_is_explained(monkeypatch):
    """torchrun --nproc-per-node 2 on a 1-GPU node: rank 1 must say why instead of failing in
    set_device ("invalid device ordinal")."""
    from parallel.distributed import init_distributed
    from parallel.errors import DistributedSetupError

    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    _pretend_gpus(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail(f"set_device({i}) was called"))
    with pytest.raises(DistributedSetupError, match="local rank 1 has no GPU: this node has 1"):
        init_distributed(2, 1, seed=0)


def test_the_launcher_refuses_more_ranks_than_gpus(monkeypatch):
    """`rho train --tp 2` on a 1-GPU machine: a one-line refusal before any process starts."""
    from rhocli.core import launch
    from rhocli.core.errors import NotAvailableError

    _pretend_gpus(monkeypatch, 1)
    monkeypatch.setattr(launch, "under_torchrun", lambda: False)
    with pytest.raises(NotAvailableError, match="starts 2 processes, one per GPU .* this machine has 1"):
        launch.run_ranks(2, lambda spec, renderer: pytest.fail("a rank ran"), {}, None)


def test_a_cuda_run_on_the_pytorch_loss_warns(monkeypatch, caplog):
    """On CUDA without the compiled kernel (a failed build), the PyTorch loss is chosen with a
    warning; RHO_KERNEL=cuda makes it an error naming the reason."""
    from cuda_ext import dispatch
    from cuda_ext.errors import KernelUnavailableError

    monkeypatch.setattr(dispatch, "_announced", {})
    monkeypatch.setattr(dispatch, "_extensions", {})  # as if nothing were built yet in this process
    monkeypatch.setitem(dispatch._failures, "cuda", "the cuda extension could not be built: nvcc failed")
    monkeypatch.delenv("RHO_KERNEL", raising=False)
    with caplog.at_level(logging.INFO, logger="rho.kernel"):
        choice = dispatch.choose(torch.device("cuda", 0), torch.bfloat16)
    assert choice.backend == "torch"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "nvcc failed" in warned[0].getMessage()
    # on CPU the same fallback is routine: no warning
    caplog.clear()
    monkeypatch.setitem(dispatch._failures, "cpu", "the cpu extension could not be built: no compiler")
    with caplog.at_level(logging.INFO, logger="rho.kernel"):
        assert dispatch.choose(torch.device("cpu"), torch.float32).backend == "torch"
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    monkeypatch.setenv("RHO_KERNEL", "cuda")
    with pytest.raises(KernelUnavailableError, match="RHO_KERNEL=cuda cannot run: .*nvcc failed"):
        dispatch.choose(torch.device("cuda", 0), torch.bfloat16)
