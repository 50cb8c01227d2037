"""Training samples over indexed datasets: what one row of a batch holds.

Every dataset here is map-style (`len`, `ds[i]`) and returns numpy arrays of
exactly `seq_length` entries:

    input_ids     token ids (padding: 0)
    labels        already shifted: labels[t] is the target of position t, -100 for no loss
    document_ids  equal within one document / packed sample; attention must not cross a change
    position_ids  position inside the document (see each class)

PretrainDataset is the pretraining sample index: the documents of the `.bin`, back
to back, cut into fixed windows of seq_length + 1 tokens (consecutive windows
share one token), so samples cross document boundaries; the boundaries come back
from the index (they fall right after each EOD token when written with
--append-eod). SFTDataset serves one packed (or single) sample per row, padded.
BlendedDataset mixes datasets by weight, deterministically.
"""

import logging

import numpy as np

from meshtron.data import names
from meshtron.data.handlers import IGNORE_INDEX
from meshtron.data.indexed import IndexedDataset
from meshtron.errors import UserError

logger = logging.getLogger(__name__)


def restart_positions(document_ids: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... restarting wherever the document id changes."""
    n = len(document_ids)
    index = np.arange(n)
    change = np.ones(n, dtype=bool)
    change[1:] = document_ids[1:] != document_ids[:-1]
    return index - np.maximum.accumulate(np.where(change, index, 0))


class PretrainDataset:
    """Fixed windows across documents. position_ids run 0..S-1 unless `reset_position_ids`."""

    def __init__(self, prefix: str, seq_length: int, reset_position_ids: bool = False) -> None:
        self.data = IndexedDataset(prefix)
        self.seq_length = seq_length
        self.reset_position_ids = reset_position_ids
        self.tokens = self.data.tokens
        item = self.data.dtype.itemsize
        seq_starts = np.append(self.data.sequence_pointers // item, len(self.tokens))
        # Windows read the .bin as one stream, which needs the sequences back to back (as every writer lays them).
        end = seq_starts[-2] + self.data.sequence_lengths[-1] if len(self.data) else 0
        if len(self.data) and (seq_starts[0] != 0 or end != len(self.tokens)):
            raise UserError(f"{prefix}: sequences are not stored back to back; rewrite it with `meshtron preprocess`")
        self.doc_starts = seq_starts[self.data.document_indices[:-1]]
        self.num_samples = (len(self.tokens) - 1) // seq_length
        if self.num_samples < 1:
            raise UserError(f"{prefix} holds {len(self.tokens)} tokens, fewer than seq_length + 1 = {seq_length + 1}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        start = i * self.seq_length
        window = np.asarray(self.tokens[start : start + self.seq_length + 1], dtype=np.int64)
        positions = start + np.arange(self.seq_length)
        documents = np.searchsorted(self.doc_starts, positions, side="right") - 1
        documents -= documents[0]
        return {
            "input_ids": window[:-1],
            "labels": window[1:],
            "document_ids": documents,
            "position_ids": restart_positions(documents) if self.reset_position_ids else np.arange(self.seq_length),
        }


class SFTDataset:
    """One row per stored document (a packed sequence, or a single sample), padded to seq_length.

    Within a pack, each sample has its own document id and positions from 0; padding
    is one more document with no loss. The target of a sample's last token is -100
    (the next token belongs to another sample, or is padding).
    """

    def __init__(self, input_ids_prefix: str, labels_prefix: str, seq_length: int) -> None:
        self.ids = IndexedDataset(input_ids_prefix)
        self.labels = IndexedDataset(labels_prefix)
        self.seq_length = seq_length
        if self.ids.num_documents != self.labels.num_documents:
            raise UserError(f"{input_ids_prefix} and {labels_prefix} hold different numbers of samples")
        doc_lengths = np.add.reduceat(self.ids.sequence_lengths, self.ids.document_indices[:-1]) \
            if len(self.ids) else np.zeros(0, dtype=np.int64)
        too_long = doc_lengths > seq_length
        if too_long.any():
            packs = np.diff(self.ids.document_indices) > 1
            if (too_long & packs).any():
                raise UserError(f"{input_ids_prefix} was packed to {int(doc_lengths.max())} tokens, more than "
                                f"seq_length {seq_length}; preprocess again with --seq-length {seq_length}")
            logger.warning("%d of %d samples in %s are longer than seq_length %d and are cut at load time",
                           int(too_long.sum()), len(doc_lengths), input_ids_prefix, seq_length)

    def __len__(self) -> int:
        return self.ids.num_documents

    def __getitem__(self, i: int) -> dict:
        S = self.seq_length
        tokens = self.ids.document(i)[:S]
        stored_labels = self.labels.document(i)[:S]
        n = len(tokens)
        sequences = self.ids.document_sequences(i)
        seq_lengths = self.ids.sequence_lengths[sequences.start : sequences.stop]
        documents = np.repeat(np.arange(len(seq_lengths)), seq_lengths)[:n]
        documents = np.concatenate([documents, np.full(S - n, len(seq_lengths), dtype=np.int64)])
        input_ids = np.zeros(S, dtype=np.int64)
        input_ids[:n] = tokens
        labels = np.full(S, IGNORE_INDEX, dtype=np.int64)
        labels[: n - 1] = stored_labels[1:n]
        labels[:-1][documents[1:] != documents[:-1]] = IGNORE_INDEX
        return {
            "input_ids": input_ids,
            "labels": labels,
            "document_ids": documents,
            "position_ids": restart_positions(documents),
        }


class PairwiseDataset:
    """Chosen and rejected rows side by side: every SFT key with a `chosen_` / `rejected_` prefix."""

    def __init__(self, prefix: str, seq_length: int) -> None:
        self.sides = {
            side: SFTDataset(f"{prefix}_{names.side(names.INPUT_IDS, side)}",
                             f"{prefix}_{names.side(names.LABELS, side)}", seq_length)
            for side in names.SIDES
        }
        if len(self.sides["chosen"]) != len(self.sides["rejected"]):
            raise UserError(f"{prefix}: chosen and rejected hold different numbers of samples")

    def __len__(self) -> int:
        return len(self.sides["chosen"])

    def __getitem__(self, i: int) -> dict:
        return {f"{side}_{key}": value for side, ds in self.sides.items() for key, value in ds[i].items()}


class BlendedDataset:
    """Datasets mixed by weight: len = the sum of their lengths, dataset d filling weight_d of it.

    Dataset d's samples are spread evenly over the blend (its k-th sample sits near
    position (k + 0.5) / n_d of it). A dataset that must give more samples than it
    holds starts again on a seeded permutation of itself.
    """

    def __init__(self, datasets: list, weights: list[float], seed: int) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        self.datasets = datasets
        total = sum(len(d) for d in datasets)
        exact = weights / weights.sum() * total
        counts = np.floor(exact).astype(np.int64)
        # Largest remainders get the leftover samples, so counts sum to the total exactly.
        counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
        keys = np.concatenate([(np.arange(n) + 0.5) / n for n in counts])
        which = np.concatenate([np.full(n, d) for d, n in enumerate(counts)])
        nth = np.concatenate([np.arange(n) for n in counts])
        order = np.argsort(keys, kind="stable")
        self.which, self.nth = which[order], nth[order]
        self.perms = [np.random.default_rng([seed, d]).permutation(len(ds)) for d, ds in enumerate(datasets)]

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i: int) -> dict:
        d, k = int(self.which[i]), int(self.nth[i])
        ds = self.datasets[d]
        # The first pass is in order; later passes (oversampling) follow the permutation.
        return ds[k] if k < len(ds) else ds[int(self.perms[d][k % len(ds)])]
