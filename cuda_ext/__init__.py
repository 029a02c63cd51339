"""The fused selective-loss op (log-softmax + reference-loss subtraction + top-k masking, forward and
backward): a PyTorch reference, a C++ CPU kernel, a CUDA kernel and a dispatcher. Imports nothing
from ``rhocli`` or ``parallel``. (Lands with the cuda_ext issue.)"""
