"""Process groups: torch.distributed + megatron-core's model-parallel state, on GPU (NCCL) or CPU (gloo).

The worker side of `rho train`; the environment comes from torchrun or rho's own launcher:

    # CPU, 4 processes, TP2 x PP2
    torchrun --nproc-per-node 4 my_worker.py
    # one GPU node, 8 processes: the same command with --nproc-per-node 8

    layout = init_distributed(tp=2, pp=2, seed=1234)
    try:
        ...
    finally:
        destroy_distributed()
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from parallel.cpu_compat import apply_cpu_compat
from parallel.errors import DistributedSetupError
from parallel.layout import data_parallel_size

__all__ = ["Layout", "init_distributed", "destroy_distributed"]

_ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Layout:
    """Where this process sits: world_size = tp * pp * dp."""

    world_size: int
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size: world_size // (tp * pp * cp)."""
    rank: int
    """Global rank."""
    local_rank: int
    """Rank on this node (the GPU index with NCCL)."""
    backend: str
    """"nccl" or "gloo"."""
    cp: int = 1
    """Context-parallel size (each sequence split over cp ranks)."""


def init_distributed(tp: int, pp: int, seed: int, timeout_s: float = 600, virtual_pp: int | None = None,
                     cp: int = 1) -> Layout:
    """Create the process group and megatron's TP/PP/DP groups, seed every RNG; return the Layout.

    Reads RANK, WORLD_SIZE, LOCAL_RANK (default: RANK), MASTER_ADDR and MASTER_PORT from the
    environment. ``virtual_pp`` > 1: the interleaved schedule's virtual pipeline stages. With CUDA: NCCL on device LOCAL_RANK. Without: gloo, after `apply_cpu_compat()`.
    Raises DistributedSetupError when the environment is incomplete, LayoutError when tp x pp does
    not divide the world size.
    """
    missing = [name for name in _ENV_VARS if name not in os.environ]
    if missing:
        raise DistributedSetupError(
            f"{', '.join(missing)} not set: start the workers with torchrun or `rho train`"
        )
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dp = data_parallel_size(world_size, tp, pp, cp=cp)
    if dist.is_initialized():
        raise RuntimeError("init_distributed called twice; call destroy_distributed() first")

    if torch.cuda.is_available():
        backend = "nccl"
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:  # set_device would fail with "invalid device ordinal"
            raise DistributedSetupError(
                f"local rank {local_rank} has no GPU: this node has {gpus} visible (CUDA_VISIBLE_DEVICES), "
                f"so start at most {gpus} processes per node"
            )
        torch.cuda.set_device(local_rank)
    else:
        backend = "gloo"
        apply_cpu_compat()
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pp if (virtual_pp or 1) > 1 else None,
        context_parallel_size=cp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
    )
    torch.manual_seed(seed)
    # Data-parallel, tensor-parallel (seed + 2718 + tp_rank) and expert streams of megatron's
    # RNG tracker; on CPU the tracker is cpu_compat's CpuRNGStatesTracker.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Layout(
        world_size=world_size,
        tp=tp,
        pp=pp,
        dp=dp,
        rank=rank,
        local_rank=local_rank,
        backend=backend,
        cp=cp,
    )


def destroy_distributed() -> None:
    """Tear down megatron's model-parallel state and the process group; safe to call twice."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
