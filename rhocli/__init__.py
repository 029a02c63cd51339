"""rho: Rho-1's Selective Language Modeling at Megatron scale.

``rhocli`` is the user-facing package: the ``rho`` command (``app``, ``commands/``), one folder per
stage library (``tokenize/ train/ score/ select/ convert/ bench/ demo/``) and the leaf utilities every
stage uses (``core/``: errors, config, launcher, on-disk formats, tokenizers). It never runs
torch.distributed collectives itself; that is the engine's (``parallel``) job. docs/architecture.md
has the layers and the rules a test keeps. Heavy libraries (torch, megatron-core) are imported lazily
inside the stages that need them so that ``rho --help`` stays fast.
"""

__version__ = "0.1.0"
