"""rho: Rho-1's Selective Language Modeling at Megatron scale.

``rhocli`` is the user-facing package: the ``rho`` command, stage options, on-disk formats, tokenizers
and errors. It never runs torch.distributed collectives itself; that is ``parallel``'s job.
Heavy libraries (torch, megatron-core) are imported lazily inside the stages that need them so that
``rho --help`` stays fast.
"""

__version__ = "0.1.0"
