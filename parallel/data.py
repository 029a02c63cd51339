"""Training data: rho token datasets through megatron-core's ``GPTDataset`` and
``BlendedMegatronDatasetBuilder`` (blends with weights, a train/valid split, sample-index caches).

Sample order is fixed by the dataset seed; which samples a rank reads is fixed by the number of
samples consumed so far, so resuming at ``consumed_samples`` continues the exact same stream. Every
rank of a model-parallel group reads the same micro-batch from the memory-mapped dataset itself (no
broadcast needed: the reads are deterministic and cheap).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy
import torch

from parallel.errors import StoreContentError


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The three ids megatron's GPTDataset reads from its ``config.tokenizer``."""

    vocab_size: int
    eod: int
    pad: int = -1  # no padding token: GPTDataset then masks nothing by id

    @property
    def unique_identifiers(self) -> dict:
        """Part of the hash that names GPTDataset's cached indices (megatron serialises this)."""
        return {"class": "rho.TokenIds", "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None
    seq_length: int
    seed: int
    split: str
    token_ids: TokenIds
    cache_dir: str | None
    #: score stores aligned with ``prefixes`` (same order); empty for plain training
    scores: tuple[str, ...] = ()
    #: static mask stores (rho select) aligned with ``prefixes``; empty: every token
    masks: tuple[str, ...] = ()
    #: reference-entropy stores aligned with ``prefixes`` (``--select-by entropy``); empty: none read
    entropies: tuple[str, ...] = ()
    #: validation datasets of their own (``eval_data``); empty: the ``split`` of ``prefixes``
    eval_prefixes: tuple[str, ...] = ()
    eval_weights: tuple[float, ...] | None = None
    #: static mask stores aligned with ``eval_prefixes``; empty: every token validated
    eval_masks: tuple[str, ...] = ()
    #: packed documents do not see each other: megatron's reset_attention_mask (each sample gets an
    #: attention mask [1, s, s], True = hidden, cut after every EOD) and reset_position_ids
    separate_documents: bool = False
    #: each sample holds whole documents (examples), padded at its end, never one cut at a sample's
    #: edge (a document longer than a sample is still cut); False: GPTDataset's stream packing
    whole_documents: bool = False


def _scored_dataset_classes():
    """GPTDataset and its config, extended to return each sample's reference losses.

    The reference losses of a sample are read with exactly the indices GPTDataset uses for its
    tokens: ``_query_document_sample_shuffle_indices`` is run a second time with the score store in
    place of the token dataset (both have the same document boundaries), so samples that span
    documents, start mid-document or wrap are aligned token for token.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    @dataclasses.dataclass
    class ScoredGPTDatasetConfig(GPTDatasetConfig):
        #: token dataset prefix -> score store prefix
        score_prefixes: dict = dataclasses.field(default_factory=dict)
        #: token dataset prefix -> mask store prefix
        mask_prefixes: dict = dataclasses.field(default_factory=dict)
        #: token dataset prefix -> reference-entropy store prefix
        entropy_prefixes: dict = dataclasses.field(default_factory=dict)
        #: pack whole documents per sample (``whole_document_indices``)
        whole_documents: bool = False

    class _Float32AsInt32:
        """The score store seen through ``get`` as int32 bit patterns: GPTDataset concatenates a
        sample's parts as int64, which keeps int32 values exactly (float32 would not cast)."""

        def __init__(self, scores):
            self.scores = scores

        def get(self, idx, offset=0, length=None):
            return self.scores.get(idx, offset=offset, length=length).view(numpy.int32)

    class ScoredGPTDataset(GPTDataset):
        def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
            super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
            scores = config.score_prefixes.get(dataset_path)
            self.scores_prefix = scores
            self.scores = _Float32AsInt32(IndexedDataset(scores, mmap=True)) if scores else None
            masks = config.mask_prefixes.get(dataset_path)
            self.masks = IndexedDataset(masks, mmap=True) if masks else None
            entropies = config.entropy_prefixes.get(dataset_path)
            self.entropies_prefix = entropies
            self.entropies = _Float32AsInt32(IndexedDataset(entropies, mmap=True)) if entropies else None

        def _build_document_sample_shuffle_indices(self):
            if not self.config.whole_documents or not len(self.indices):
                return super()._build_document_sample_shuffle_indices()
            return whole_document_indices(self.dataset.sequence_lengths, self.indices, self.num_samples,
                                          self.config.sequence_length, self.config.random_seed)

        def _aligned(self, store, idx):
            """The store's values for sample ``idx``, sliced exactly as its tokens are."""
            tokens_ds = self.dataset
            try:
                self.dataset = store
                values, _ = self._query_document_sample_shuffle_indices(0 if idx is None else idx)
            finally:
                self.dataset = tokens_ds
            return values

        def __getitem__(self, idx):
            sample = super().__getitem__(idx)
            if self.masks is not None:
                keep = self._aligned(self.masks, idx)[1:] > 0  # uint8 0/1 (padding: -1, dropped)
                sample["loss_mask"] = sample["loss_mask"] * torch.from_numpy(keep.astype("float32"))
            if self.scores is not None:
                bits = self._aligned(self.scores, idx)
                # bits: [seq + 1] aligned with the sample's text (padding: NaN, masked); labels = text[1:]
                values = bits.astype(numpy.int32).view(numpy.float32)
                ref_loss = values[1:].copy()
                # a trained-on token's reference loss is a finite number (padding, masked, reads NaN)
                if not numpy.isfinite(ref_loss[sample["loss_mask"].numpy() > 0]).all():
                    raise StoreContentError(f"{self.scores_prefix}.bin: a non-finite reference loss in training "
                                            f"sample {idx}; the store is damaged (verify it, or score again)")
                sample["ref_loss"] = torch.from_numpy(ref_loss)
            if self.entropies is not None:
                entropy = self._aligned(self.entropies, idx).astype(numpy.int32).view(numpy.float32)[1:].copy()
                if not numpy.isfinite(entropy[sample["loss_mask"].numpy() > 0]).all():
                    raise StoreContentError(f"{self.entropies_prefix}.bin: a non-finite entropy in training sample "
                                            f"{idx}; the store is damaged (verify it, or score again)")
                sample["ref_entropy"] = torch.from_numpy(entropy)
            return sample

    return ScoredGPTDataset, ScoredGPTDatasetConfig


def whole_document_indices(lengths, documents, num_samples: int | None, seq_length: int, seed: int):
    """GPTDataset's three indices (document, sample, shuffle) for samples of whole documents.

    The document index is GPTDataset's: the split's documents, shuffled anew for every epoch, as many
    epochs as the samples need. A sample is the longest run of whole documents from where the last
    one ended that fits ``seq_length`` tokens; GPTDataset's reader then adds the next document's
    first token (the last label, which a response mask leaves out: it is a prompt's) and pads the
    rest (labels masked). A document longer than ``seq_length`` is cut into full samples, as GPTDataset
    would, and its tail starts the next one. sample_index rows are (document_index position, offset)."""
    lengths = numpy.asarray(lengths, dtype=numpy.int64)
    documents = numpy.asarray(documents, dtype=numpy.int64)
    rng = numpy.random.RandomState(seed)
    order: list[numpy.ndarray] = []
    size = 0

    def length_at(position: int) -> int:
        nonlocal size
        while position >= size:  # another epoch of the documents, shuffled
            epoch = documents.copy()
            rng.shuffle(epoch)
            order.append(epoch)
            size += epoch.size
        return int(lengths[order[position // documents.size][position % documents.size]])

    wanted = num_samples if num_samples is not None else whole_document_samples(lengths[documents], seq_length)
    bounds = [(0, 0)]
    while len(bounds) <= wanted:
        bounds.append(_next_sample_start(length_at, *bounds[-1], seq_length))
    length_at(bounds[-1][0] + 1)  # the last sample's extra label token exists
    document_index = numpy.concatenate(order).astype(numpy.int32)
    sample_index = numpy.array(bounds, dtype=numpy.int64)
    shuffle_index = rng.permutation(wanted).astype(numpy.uint32 if wanted < 2**32 - 1 else numpy.int64)
    return document_index, sample_index, shuffle_index


def _next_sample_start(length_at, position: int, offset: int, seq_length: int) -> tuple[int, int]:
    """Where the sample that starts at document ``position``, token ``offset`` ends (and the next
    starts): a long document gives a full sample of itself; else as many whole documents as fit."""
    rest = length_at(position) - offset
    if rest > seq_length:
        return position, offset + seq_length
    room, position = seq_length - rest, position + 1
    while length_at(position) <= room:
        room -= length_at(position)
        position += 1
    return position, 0


def whole_document_samples(lengths, seq_length: int) -> int:
    """Samples of whole documents that one pass over documents of ``lengths`` (in this order) fills:
    what an epoch is with ``whole_documents`` (the shuffled order changes it by a sample or two)."""
    lengths = [int(n) for n in lengths]
    big = seq_length + 1  # past the end: a document that never fits, so the last sample closes

    def length_at(i):
        return lengths[i] if i < len(lengths) else big

    samples, position, offset = 0, 0, 0
    while position < len(lengths):
        position, offset = _next_sample_start(length_at, position, offset, seq_length)
        samples += 1
    return max(1, samples)


def build_datasets(spec: DataSpec, train_samples: int, valid_samples: int):
    """(train, valid) GPTDatasets; call on every rank (megatron builds caches on rank 0 first)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    dataset_cls, config_cls = _scored_dataset_classes()
    blend = (list(spec.prefixes), list(spec.weights) if spec.weights else None)
    if spec.eval_prefixes:
        # Megatron's --train-data-path / --valid-data-path: each split reads its own datasets whole.
        eval_blend = (list(spec.eval_prefixes), list(spec.eval_weights) if spec.eval_weights else None)
        splits = {"blend": None, "blend_per_split": [blend, eval_blend, None], "split": None}
    else:
        splits = {"blend": blend, "split": spec.split}
    config = config_cls(
        random_seed=spec.seed,
        sequence_length=spec.seq_length,
        **splits,
        path_to_cache=spec.cache_dir,
        tokenizer=spec.token_ids,
        reset_position_ids=spec.separate_documents,
        reset_attention_mask=spec.separate_documents,
        eod_mask_loss=False,
        create_attention_mask=spec.separate_documents,
        mmap_bin_files=True,
        score_prefixes=dict(zip(spec.prefixes, spec.scores)),
        # a dataset's mask, by the dataset's path: validation datasets get theirs the same way
        mask_prefixes={**dict(zip(spec.prefixes, spec.masks)), **dict(zip(spec.eval_prefixes, spec.eval_masks))},
        entropy_prefixes=dict(zip(spec.prefixes, spec.entropies)),
        whole_documents=spec.whole_documents,
    )
    train, valid, _test = BlendedMegatronDatasetBuilder(
        dataset_cls, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, valid


class MicroBatches:
    """This DP rank's micro-batches, starting after ``consumed_samples`` global samples.

    A global batch is ``global_batch_size`` consecutive sample indices; micro-batch ``j`` of DP rank
    ``d`` holds samples ``[(j * dp + d) * mbs, +mbs)`` of it (Megatron's pretraining sampler), so the
    union over DP ranks of a step's samples does not depend on the DP size. Each micro-batch carries
    ``samples`` [b]: the global sample numbers of its rows.

    ``sample_values``: {"ref_loss": [samples, seq_length] float32, ...} read by global sample number
    (a sample score store: values of the run's own samples, ``rho score --for-run``), named
    ``values_source`` in messages.
    """

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 random_seed: int | None = None, sample_values: dict | None = None, values_source: str = ""):
        self.dataset = dataset
        self.next_sample = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.random_seed = random_seed
        self.sample_values = sample_values or {}
        self.values_source = values_source

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.next_sample + self.dp_rank * self.mbs
        self.next_sample += self.mbs * self.dp_size
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(self.mbs)]
        keys = ("tokens", "labels", "loss_mask", "position_ids") + tuple(
            k for k in ("ref_loss", "ref_entropy", "attention_mask") if k in samples[0])  # attention_mask: [b, 1, s, s]
        batch = {key: torch.stack([s[key] for s in samples]) for key in keys}
        batch["samples"] = torch.arange(start, start + self.mbs, dtype=torch.int64)
        for key, values in self.sample_values.items():
            if start + self.mbs > values.shape[0]:
                raise StoreContentError(f"{self.values_source}: holds {values.shape[0]:,} samples; the run reads "
                                        f"sample {start + self.mbs - 1:,}")
            rows = numpy.array(values[start:start + self.mbs], dtype=numpy.float32)  # [b, s]
            if not numpy.isfinite(rows[batch["loss_mask"].numpy() > 0]).all():
                raise StoreContentError(f"{self.values_source}: a non-finite {key} in training samples {start:,}-"
                                        f"{start + self.mbs - 1:,}; the store is damaged (verify it, or score again)")
            batch[key] = torch.from_numpy(rows)
        if self.random_seed is not None:  # [b, s]: sample n's draws depend on (seed, n) only
            batch["random"] = torch.stack([random_draws(self.random_seed, start + i, batch["tokens"].shape[1])
                                           for i in range(self.mbs)])
        return batch


def random_draws(seed: int, sample: int, length: int) -> torch.Tensor:
    """Uniform [0, 1) fp32 draws for the tokens of global sample ``sample``: the random selection
    control, the same whatever the layout, the micro-batching or the DP size."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + sample) % (2**63 - 1))
    return torch.rand(length, generator=generator)
