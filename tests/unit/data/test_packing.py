"""Packing: capacity respected, every sample exactly once, deterministic."""

import numpy as np
import pytest

from meshtron.data.packing import pack_lengths, pad_ratio


@pytest.mark.parametrize("window", [7, 1000])
def test_packs_fit_and_cover_every_sample_once(window):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500)
    packs = list(pack_lengths(lengths, 64, window=window))
    assert all(lengths[p].sum() <= 64 for p in packs)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(500))
    assert all(p == sorted(p) for p in packs)  # input order kept inside a pack
    if window >= len(lengths):
        # Best-fit decreasing over the whole set wastes little.
        assert len(packs) <= int(np.ceil(lengths.sum() / 64 * 1.15)) + 2
    assert list(pack_lengths(lengths, 64, window=window)) == packs


def test_pack_rejects_oversized_sample():
    with pytest.raises(ValueError, match="does not fit"):
        list(pack_lengths([3, 9], 8))


def test_pad_ratio():
    assert pad_ratio(75, 2, 50) == pytest.approx(0.25)
    assert pad_ratio(0, 0, 50) == 0.0
