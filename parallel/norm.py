"""RMSNorm for megatron-core's local layer spec, with sequence parallelism.

The local spec's norm (``WrappedTorchNorm``: a plain ``torch.nn.RMSNorm``) refuses
``sequence_parallel`` (megatron-core 0.16-0.19 assert it off), because under sequence parallelism a
norm sees only its rank's slice of the sequence and its weight's gradient is a partial sum: the weight
must be marked ``sequence_parallel`` so that ``finalize_model_grads`` all-reduces its gradient across
the tensor-parallel group (``_allreduce_non_tensor_model_parallel_grads``), which is what Transformer
Engine's and Apex's norms do. ``RMSNorm`` is that: the same module and parameter name as the local
spec's (checkpoints are unchanged), with the attribute set from the config.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built the way megatron-core builds a norm (``build_module(spec, config=,
    hidden_size=, eps=)``), its weight marked for sequence parallelism when the config asks for it."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if normalization != "RMSNorm" or getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("parallel.norm.RMSNorm is a plain RMSNorm (no zero-centred gamma)")
        # in the model's parameter dtype, as every other weight (megatron's Float16Module casts the
        # whole model; a float32 weight under bf16/fp16 activations takes PyTorch's slow mixed path)
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
