"""The one home of layout checks: does a tp x pp x dp layout fit the world, the model and the batch?

Every caller (``rho train``/``rho score`` validation before any worker starts, process-group setup,
model building) asks here, so a layout is refused with the same words wherever it is met. Errors are
``LayoutError``s whose sizes the caller names its own way (``err.render({"tp": "--tp"})``).
"""

from __future__ import annotations

from parallel.config import ModelConfig
from parallel.errors import LayoutError


def data_parallel_size(world_size: int, tp: int, pp: int, dp: int | None = None, cp: int = 1) -> int:
    """world_size // (tp * pp * cp), after checking that the sizes are positive, that tp x pp x cp
    divides the world and that an explicit ``dp`` agrees."""
    if tp < 1 or pp < 1 or cp < 1 or (dp is not None and dp < 1) or world_size < 1:
        raise LayoutError("{tp}, {pp}, {cp} and {dp} must be >= 1", tp=None, pp=None, cp=None, dp=None)
    if world_size % (tp * pp * cp):
        if cp == 1:
            raise LayoutError(f"{{tp}} x {{pp}} = {tp * pp} does not divide the world size {world_size}", tp=tp, pp=pp)
        raise LayoutError(f"{{tp}} x {{pp}} x {{cp}} = {tp * pp * cp} does not divide the world size {world_size}",
                          tp=tp, pp=pp, cp=cp)
    derived = world_size // (tp * pp * cp)
    if dp is not None and dp != derived:
        of = f"tp {tp} x pp {pp}" + (f" x cp {cp}" if cp > 1 else "")
        raise LayoutError(f"{{dp}} does not match world size {world_size} / ({of}) = {derived}", dp=dp)
    return derived


def check_model_fits(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Tensor parallelism splits attention heads, key/value groups and the padded vocabulary; pipeline
    parallelism splits the layers evenly."""
    if cfg.num_attention_heads % tp:
        raise LayoutError(f"{{tp}} must divide num_attention_heads={cfg.num_attention_heads}", tp=tp)
    if cfg.num_query_groups % tp:
        raise LayoutError(f"{{tp}} must divide num_query_groups={cfg.num_query_groups}", tp=tp)
    if cfg.num_layers % pp:
        raise LayoutError(f"{{pp}} must divide num_layers={cfg.num_layers}", pp=pp)
    padded_vocab_size(1, tp, cfg.make_vocab_size_divisible_by)


def check_sequence_parallel(enabled: bool, tp: int, seq_length: int) -> None:
    """Sequence parallelism splits each sequence over the tensor-parallel ranks."""
    if not enabled:
        return
    if tp < 2:
        raise LayoutError("sequence parallelism needs {tp} > 1 (it splits the sequence over the TP ranks)", tp=tp)
    if seq_length % tp:
        raise LayoutError(f"sequence parallelism needs a sequence length that {{tp}} divides (got {seq_length})", tp=tp)


def check_context_parallel(cp: int, seq_length: int, tp: int, sequence_parallel: bool) -> None:
    """Context parallelism gives each of the ``cp`` ranks two of the 2·cp equal chunks of every
    sequence (chunks i and 2·cp-1-i, which balances causal attention's work); with sequence
    parallelism each rank's part is split again over the TP ranks."""
    if cp == 1:
        return
    if seq_length % (2 * cp):
        raise LayoutError(f"context parallelism splits each sequence into 2 x {{cp}} chunks: the sequence length "
                          f"{seq_length} must be a multiple of {2 * cp}", cp=cp)
    if sequence_parallel and (seq_length // cp) % tp:
        raise LayoutError(f"sequence parallelism under context parallelism needs {{tp}} to divide the sequence length / "
                          f"{{cp}} = {seq_length // cp}", tp=tp, cp=cp)


def check_virtual_pipeline(vp: int | None, pp: int, num_layers: int, num_microbatches: int) -> None:
    """The interleaved schedule gives each pipeline rank ``vp`` slices of the layers and runs at least
    ``pp`` micro-batches per step (megatron-core's microbatch group)."""
    if (vp or 1) == 1:
        return
    if pp < 2:
        raise LayoutError("a virtual pipeline needs {pp} > 1", pp=pp)
    if num_layers % (pp * vp):
        raise LayoutError(f"{{pp}} x {{vp}} = {pp * vp} must divide num_layers={num_layers}", pp=pp, vp=vp)
    if num_microbatches < pp:
        raise LayoutError(f"the interleaved schedule needs at least {{pp}} micro-batches per step, got "
                          f"{num_microbatches} (raise global_batch_size or lower micro_batch_size)", pp=pp)


def micro_batches_per_step(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step."""
    if global_batch_size % (micro_batch_size * dp):
        raise LayoutError(
            f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
            f"{micro_batch_size} x data-parallel size {dp}"
        )
    return global_batch_size // (micro_batch_size * dp)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int) -> int:
    """Round the vocabulary up to a multiple of ``multiple``, which ``tp`` must divide.

    Megatron-LM pads to a multiple of ``multiple * tp``, so the padded size (and the embedding's shape
    in a checkpoint) changes with TP and a checkpoint cannot always be resharded. rho pads
    independently of TP, and requires TP to divide ``multiple`` (128: TP 1, 2, 4, ... 128).
    """
    if multiple % tp:
        raise LayoutError(f"{{tp}} must divide make_vocab_size_divisible_by={multiple}", tp=tp)
    return ((vocab_size + multiple - 1) // multiple) * multiple
