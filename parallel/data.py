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

import torch


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


def build_datasets(spec: DataSpec, train_samples: int, valid_samples: int):
    """(train, valid) GPTDatasets; call on every rank (megatron builds caches on rank 0 first)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blend = (list(spec.prefixes), list(spec.weights) if spec.weights else None)
    config = GPTDatasetConfig(
        random_seed=spec.seed,
        sequence_length=spec.seq_length,
        blend=blend,
        split=spec.split,
        path_to_cache=spec.cache_dir,
        tokenizer=spec.token_ids,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    train, valid, _test = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, valid


class MicroBatches:
    """This DP rank's micro-batches, starting after ``consumed_samples`` global samples.

    A global batch is ``global_batch_size`` consecutive sample indices; micro-batch ``j`` of DP rank
    ``d`` holds samples ``[(j * dp + d) * mbs, +mbs)`` of it (Megatron's pretraining sampler), so the
    union over DP ranks of a step's samples does not depend on the DP size.
    """

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.dataset = dataset
        self.next_sample = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.next_sample + self.dp_rank * self.mbs
        self.next_sample += self.mbs * self.dp_size
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(self.mbs)]
        return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}
