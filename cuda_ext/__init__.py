"""The fused selective-loss op (log-softmax + reference-loss subtraction + top-k masking, forward and
backward): a PyTorch reference (``reference.py``, the spec), a C++ CPU kernel and a CUDA kernel
(``csrc/``), torch.library custom ops (``ops.py``) and a dispatcher (``dispatch.py``).
Imports nothing from ``rhocli`` or ``parallel``.
"""

from cuda_ext.ops import per_token_loss, selective_loss, topk_mask
from cuda_ext.reference import SelectiveLoss, selective_loss_reference, selection_k

__all__ = ["selective_loss", "per_token_loss", "topk_mask", "selective_loss_reference", "SelectiveLoss", "selection_k"]
