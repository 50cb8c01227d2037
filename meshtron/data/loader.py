"""The training data loader: deterministic, sharded by data-parallel rank, resumable.

The global order of samples depends only on (seed, dataset): epoch e visits the
dataset in the permutation `default_rng([seed, e]).permutation(len(dataset))`
(or in order with shuffle=False), and epochs follow each other without end.
Micro-batches are cut from that stream in rounds of micro_batch_size * dp_size
samples; in each round rank r takes the samples r, r + dp_size, r + 2 * dp_size, ...

The state is the number of samples consumed by all ranks together, so a run
resumed at another dp_size (or micro-batch size) continues with the next unseen
sample of the same global stream.
"""

import logging

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

from meshtron.data import indexed, names
from meshtron.data.samples import BlendedDataset, PairwiseDataset, PretrainDataset, SFTDataset
from meshtron.errors import UserError

logger = logging.getLogger(__name__)

KINDS = names.KINDS


def _open(prefix: str, seq_length: int, kind: str, reset_position_ids: bool):
    if kind == "pretrain":
        path = prefix if indexed.exists(prefix) else f"{prefix}_{names.TEXT}"
        return PretrainDataset(path, seq_length, reset_position_ids)
    base = names.base_prefix(prefix, kind)
    if kind == "sft":
        return SFTDataset(f"{base}_{names.INPUT_IDS}", f"{base}_{names.LABELS}", seq_length)
    return PairwiseDataset(base, seq_length)


def build_dataset(prefixes: list[str], weights: list[float] | None, seq_length: int, kind: str, seed: int,
                  reset_position_ids: bool = False):
    """The dataset of a training run.

    prefixes: the `--output-prefix` of `meshtron preprocess` (or a full dataset prefix such as
    PREFIX_text_document). weights: one per prefix (None: in proportion to their sizes).
    kind: "pretrain", "sft" or "pairwise". seed: used for blending (oversampled passes).
    """
    if kind not in KINDS:
        raise UserError(f"unknown data kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not prefixes:
        raise UserError("no data prefixes given")
    if seq_length < 1:
        raise UserError(f"seq_length must be positive, got {seq_length}")
    datasets = [_open(p, seq_length, kind, reset_position_ids) for p in prefixes]
    if weights is None:
        weights = [len(d) for d in datasets]
    if len(weights) != len(prefixes):
        raise UserError(f"{len(weights)} data weights for {len(prefixes)} prefixes; give one weight per prefix")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"data weights must be non-negative with a positive sum, got {weights}")
    if len(datasets) == 1:
        return datasets[0]
    return BlendedDataset(datasets, weights, seed)


def collate(samples: list[dict]) -> dict:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


class DataLoader(Stateful):
    """Yields micro-batches of dicts of LongTensors (B, S) for this data-parallel rank, without end."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool = True) -> None:
        if micro_batch_size < 1:
            raise UserError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if len(dataset) == 0:
            raise UserError("the dataset is empty")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.consumed_samples = 0
        self._epoch, self._perm = -1, None

    def _sample_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return int(self._perm[offset])

    def __iter__(self):
        while True:
            start = self.consumed_samples
            positions = start + self.dp_rank + self.dp_size * np.arange(self.micro_batch_size)
            batch = collate([self.dataset[self._sample_index(int(p))] for p in positions])
            # Counted before the yield: once the trainer holds the batch, it is consumed.
            self.consumed_samples = start + self.micro_batch_size * self.dp_size
            yield batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "num_samples": len(self.dataset)}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["seed"] != self.seed or state_dict["num_samples"] != len(self.dataset):
            logger.warning(
                "resuming data from a run with seed %s over %s samples, now seed %s over %s: the sample order differs",
                state_dict["seed"], state_dict["num_samples"], self.seed, len(self.dataset))
        self.consumed_samples = int(state_dict["consumed_samples"])
