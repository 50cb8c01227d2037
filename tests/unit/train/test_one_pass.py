"""One pass over the held-out data covers every sample once where it can: whole rounds of
micro_batch_size x data-parallel size, then the rest in smaller micro-batches; where it cannot (a
pipeline's fixed micro-batches, fewer samples left than ranks) a warning names what is left out."""

import pytest

from meshtron.train.data import dropped_samples_note, one_pass, one_pass_coverage


class Numbers:
    """A dataset whose sample i is the single token i."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        return {"input_ids": torch.tensor([i])}


def samples_of_each_rank(n, mbs, dp, whole_rounds=False):
    ranks = [[b["input_ids"].flatten().tolist() for b in one_pass(Numbers(n), mbs, rank, dp, whole_rounds)]
             for rank in range(dp)]
    assert len({len(batches) for batches in ranks}) == 1  # every rank runs the same number of forwards
    return [sample for batches in ranks for batch in batches for sample in batch]


@pytest.mark.parametrize("n, mbs, dp", [(60, 4, 1), (60, 8, 1), (35, 2, 1), (60, 8, 2), (61, 4, 4), (63, 4, 4),
                                        (5, 8, 1), (10, 4, 2), (61, 4, 2)])
def test_every_sample_once(n, mbs, dp):
    assert sorted(samples_of_each_rank(n, mbs, dp)) == list(range(n))
    assert one_pass_coverage(n, mbs, dp) == n and dropped_samples_note(n, mbs, dp) is None


@pytest.mark.parametrize("n, mbs, dp, whole_rounds, covered", [(60, 8, 1, True, 56), (57, 4, 2, False, 56),
                                                               (66, 4, 4, False, 64)])
def test_what_a_pass_leaves_out_is_named(n, mbs, dp, whole_rounds, covered):
    assert sorted(samples_of_each_rank(n, mbs, dp, whole_rounds)) == list(range(covered))
    assert one_pass_coverage(n, mbs, dp, whole_rounds) == covered
    note = dropped_samples_note(n, mbs, dp, whole_rounds)
    assert f"covers {covered} of the {n} samples" in note and f"leaves the last {n - covered} out" in note
    assert ("a pipeline runs whole micro-batches" if whole_rounds else "fewer than one per data-parallel rank") in note


def test_a_pass_shorter_than_one_round_that_cannot_run_smaller_repeats_samples_and_says_so():
    assert samples_of_each_rank(5, 8, 1, whole_rounds=True) == [0, 1, 2, 3, 4, 0, 1, 2]
    note = dropped_samples_note(5, 8, 1, whole_rounds=True)
    assert "5 samples, fewer than one round" in note and "to fill 8 places" in note
    assert sorted(samples_of_each_rank(1, 2, 2)) == [0, 0, 0, 0]
    assert "1 samples, fewer than one round" in dropped_samples_note(1, 2, 2)
