"""CPU compatibility layer: lets the training code written for megatron-core + NCCL run unchanged on
CPU with gloo (tests, the demo, development).

megatron-core 0.16.1 (and 0.19/0.20) assume CUDA in a handful of places; each is covered by one
named shim below (see shared/notes/megatron-on-cpu.md for how they were found). `apply_cpu_compat()`
installs them only when CUDA is absent, so on a GPU machine nothing here runs. The shims are
process-wide and cannot be undone: call it once, before building the model (`init_distributed`
does).

    from parallel.cpu_compat import apply_cpu_compat
    names = apply_cpu_compat()      # [] with CUDA; otherwise the shims installed, for the banner

Line references are to megatron-core 0.16.1 unless a version is named.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode

__all__ = ["CpuRNGStatesTracker", "apply_cpu_compat", "cpu_compat_active", "SHIMS"]

_CPU = torch.device("cpu")
# Size of a CPU (mt19937) generator state; a CUDA (Philox) state is 16 bytes.
_CPU_RNG_STATE_NUMEL = torch.get_rng_state().numel()


# --- RNG tracker -------------------------------------------------------------------------------


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron's RNG-states tracker with CPU generator states in place of CUDA ones.

    Same contract as `CudaRNGStatesTracker`: `add(name, seed)` registers a named stream, `fork(name)`
    runs a block on it and leaves the default stream as it was, `get_states`/`set_states` round-trip
    the named streams for checkpoints. On CPU the default CPU generator is the "default-rng" (what
    the default CUDA generator is on GPU), and `fork` swaps its state in and out.

    States are `torch.ByteTensor`s of a CPU generator; `set_states` refuses states of another kind
    (e.g. CUDA states from a GPU checkpoint) instead of failing later inside a forward pass.
    """

    def __init__(self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False):
        if use_cudagraphable_rng:
            raise ValueError("CUDA-graph-safe RNG (use_cudagraphable_rng) needs CUDA")
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of the named CPU generator states (safe to keep in a checkpoint)."""
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore states from `get_states()`."""
        for name, state in states.items():
            if not (
                isinstance(state, torch.Tensor)
                and state.dtype == torch.uint8
                and state.numel() == _CPU_RNG_STATE_NUMEL
            ):
                raise ValueError(
                    f"RNG tracker state {name!r} is not a CPU generator state "
                    f"(saved on a GPU run?); it cannot be restored on CPU"
                )
        self._is_initialized = True
        self.states_ = {name: state.detach().to(_CPU).clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Track a new stream seeded with `seed`; the default generator is left untouched."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the block on stream `name`, then restore the stream that was active before
        (nested forks behave as in megatron's tracker)."""
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig_state = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current state name {self._current_state_name} is not the same as the "
                    f"desired state name {name}."
                )
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig_state = self.states_[orig_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_name


def shim_rng_tracker() -> None:
    """megatron's RNG tracker reads and writes CUDA generator states: `CudaRNGStatesTracker.add`
    calls `torch.cuda.get_rng_state()` (tensor_parallel/random.py:235) and `fork` goes through
    `_get_cuda_rng_state`/`_set_cuda_rng_state` (random.py:250-277), so
    `model_parallel_cuda_manual_seed` (random.py:378) and every dropout/`fork()` fail on CPU.

    The shim makes `CpuRNGStatesTracker` the class `initialize_rng_tracker` (random.py:286)
    instantiates — it looks `CudaRNGStatesTracker` up in its module at call time, so this also
    covers `force_reset_rng=True` and the inference tracker (a subclass of it) — and installs a
    fresh one as `_CUDA_RNG_STATE_TRACKER`. `model_parallel_cuda_manual_seed(seed)` then seeds the
    three named streams from `seed` and the ranks alone: deterministic. Its
    `torch.cuda.manual_seed` call is lazily queued by torch without CUDA, a harmless no-op.

    Activation recompute is `shim_recompute_rng`'s.
    """
    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random.initialize_rng_tracker(force_reset=True)


def shim_recompute_rng() -> None:
    """Activation recompute (`tensor_parallel.checkpoint`'s `CheckpointFunction`) saves every RNG
    state before the forward and restores it before recomputing (`_get_all_rng_states` /
    `_set_all_rng_states`, random.py:444-461): the CPU generator, the CUDA generator and the
    tracker's. Without CUDA there is no CUDA generator to save: its getter returns an empty state and
    its setter does nothing, the module-level functions those two look up at call time. The CPU
    generator and the tracker (`CpuRNGStatesTracker`) are still saved and restored, so a recomputed
    forward draws what the first one drew. Proof: `tests/test_train.py::test_recompute_changes_no_number`.
    """
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None


# --- devices -----------------------------------------------------------------------------------


def _cpu_current_device() -> torch.device:
    return _CPU


def shim_current_device() -> None:
    """megatron allocates on `device=torch.cuda.current_device()` (RoPE's inv_freq,
    rotary_pos_embedding.py:162; TP and p2p buffers, layers.py:261, p2p_communication.py;
    DDP buffers), which raises without CUDA. The shim makes it return `torch.device("cpu")`."""
    torch.cuda.current_device = _cpu_current_device


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "accelerator index" in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


_TENSOR_TYPE = torch.Tensor.type
_TENSOR_TO = torch.Tensor.to
_TENSOR_CUDA = torch.Tensor.cuda


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device requests to the CPU, and makes CPU tensors' `type()` name their CUDA type.

    - `device=` of any torch function (factories, `new_*`, `as_tensor`, `Tensor.to`, ...): "cuda",
      "cuda:N", `torch.device("cuda"...)` or an int become the CPU;
    - `torch.device("cuda"...)` itself constructs the CPU device;
    - `Tensor.to(<cuda device>, ...)` positionally, and `Tensor.cuda(...)`, stay on the CPU;
    - no-arg `Tensor.type()` of a CPU tensor answers e.g. "torch.cuda.FloatTensor";
    - `pin_memory=True` is dropped (context parallelism's RoPE split, rope_utils.py:63, pins an index).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TENSOR_TYPE:
            if len(args) == 1 and not kwargs:
                name = func(*args)
                if args[0].device.type == "cpu" and name.startswith("torch.") and not args[0].is_sparse:
                    return "torch.cuda." + name[len("torch.") :]
                return name
        elif func is _TENSOR_CUDA:
            return args[0]
        elif func is torch.device:
            if (args and _is_cuda_device(args[0])) or kwargs.get("type") == "cuda":
                return _CPU
        elif func is _TENSOR_TO and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = {**kwargs, "device": _CPU}
        if kwargs.get("pin_memory"):  # pinned host memory needs a CUDA allocator
            kwargs = {**kwargs, "pin_memory": False}
        return func(*args, **kwargs)


_MODE: CudaToCpuMode | None = None


def shim_cuda_device_mode() -> None:
    """megatron hard-codes `device="cuda"` in tensor factories and moves tensors with `.cuda()`:
    the causal mask (transformer/utils.py:35), the schedules' token count (schedules.py:596, 2138),
    the optimizers' scale tensors (optimizer.py:907, grad_scaler.py:15), clip_grads.py:90/103/174,
    `broadcast_data` (tensor_parallel/data.py:37). And the optimizers accept fp32 params only if
    `param.type() == 'torch.cuda.FloatTensor'` (clip_grads.py:167, optimizer.py:690,
    distrib_optimizer.py:420).

    The shim enters one `CudaToCpuMode` globally and keeps it alive for the process. Torch function
    modes are per thread: code on threads started by the user does not see it (autograd's CPU
    backward runs on the caller's thread). Measured cost: +6-8 % per training step.
    """
    global _MODE
    _MODE = CudaToCpuMode()
    _MODE.__enter__()


def _noop_synchronize(device: object = None) -> None:
    return None


def shim_synchronize() -> None:
    """`torch.cuda.synchronize()` raises without CUDA; megatron calls it after batched p2p
    (p2p_communication.py:242/398, also avoided with `batch_p2p_sync=False`), in async checkpoint
    preload (dist_checkpointing/strategies/filesystem_async.py:230), and in DDP buffer
    offload/reload (distributed_data_parallel.py:588/611). CPU ops are synchronous: a no-op."""
    torch.cuda.synchronize = _noop_synchronize


class _CpuStream:
    """Stands for a CUDA stream on CPU, where every op is synchronous: ordering calls are no-ops."""

    def __init__(self, device: object = None, priority: int = 0, **kwargs: object) -> None:
        self.device = _CPU

    def wait_stream(self, stream: object) -> None:
        return None

    def wait_event(self, event: object) -> None:
        return None

    def record_event(self, event: object = None) -> None:
        return event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _CpuStream()


def shim_streams() -> None:
    """megatron's DDP orders gradient reduction with CUDA streams: 0.19/0.20 call
    `torch.cuda.current_stream()` on every `finish_grad_sync` (param_and_grad_buffer.py:632 in
    0.19.2); 0.16.1 uses `torch.cuda.Stream`, `torch.cuda.stream` and `torch.cuda.default_stream`
    with several distributed-optimizer instances (distributed_data_parallel.py:230,
    param_and_grad_buffer.py:417-422/529). All raise without CUDA. The shim makes
    `current_stream`/`default_stream` return a no-op stream, `Stream` construct one, and
    `stream(s)` a null context."""
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.Stream = _CpuStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


# --- registry ----------------------------------------------------------------------------------

SHIMS: dict[str, Callable[[], None]] = {
    "rng_tracker": shim_rng_tracker,
    "recompute_rng": shim_recompute_rng,
    "current_device": shim_current_device,
    "cuda_device_mode": shim_cuda_device_mode,
    "synchronize": shim_synchronize,
    "streams": shim_streams,
}
"""Every shim, by the name a banner shows, in the order `apply_cpu_compat` installs them."""

_applied: list[str] = []


def apply_cpu_compat() -> list[str]:
    """Install every shim in `SHIMS` when CUDA is absent; return their names ([] with CUDA).

    Idempotent: later calls install nothing and return the same names."""
    if torch.cuda.is_available():
        return []
    if not _applied:
        for name, install in SHIMS.items():
            install()
            _applied.append(name)
    return list(_applied)


def cpu_compat_active() -> bool:
    """Whether `apply_cpu_compat()` has installed the shims in this process."""
    return bool(_applied)
