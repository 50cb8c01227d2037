"""Packing SFT samples into sequences of at most N tokens, sample boundaries kept.

Best-fit decreasing inside windows of consecutive samples: memory and time stay
bounded for any number of samples, and the result depends only on the sample
lengths (not on how many workers tokenized them). Within a pack the samples keep
their input order. A pack is written as one document whose sequences are its
samples, so boundaries are recoverable from the index (and from the attention
mask, which numbers the samples of a pack 1, 2, 3, ...).
"""

import bisect

import numpy as np

WINDOW = 16384


def pack_lengths(lengths, capacity: int, window: int = WINDOW):
    """Group sample indices into packs whose lengths sum to at most `capacity`; yields the packs
    window by window, so only one window's packs are ever held."""
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit a pack of {capacity}")
    for begin in range(0, len(lengths), window):
        ids = np.arange(begin, min(begin + window, len(lengths)))
        order = ids[np.argsort(-lengths[ids], kind="stable")]
        window_packs: list[list[int]] = []
        # (free space, pack number), sorted: best fit is the first pack with enough free space.
        free: list[tuple[int, int]] = []
        for i in order:
            size = int(lengths[i])
            slot = bisect.bisect_left(free, (size, -1))
            if slot == len(free):
                window_packs.append([int(i)])
                bisect.insort(free, (capacity - size, len(window_packs) - 1))
            else:
                space, number = free.pop(slot)
                window_packs[number].append(int(i))
                bisect.insort(free, (space - size, number))
        for pack in window_packs:
            yield sorted(pack)


def pad_ratio(num_tokens: int, num_sequences: int, seq_length: int) -> float:
    """Fraction of padding when `num_sequences` rows of `seq_length` hold `num_tokens` tokens."""
    return 1.0 - num_tokens / (num_sequences * seq_length) if num_sequences else 0.0
