"""Mock data: deterministic, sharded by data-parallel rank like the real loader, resumable."""

import torch

from meshtron.train.data import MockDataLoader


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_two_ranks_see_the_samples_of_one_rank():
    (whole,) = take(MockDataLoader(100, 16, 4, dp_rank=0, dp_size=1, seed=0), 1)
    (r0,) = take(MockDataLoader(100, 16, 2, dp_rank=0, dp_size=2, seed=0), 1)
    (r1,) = take(MockDataLoader(100, 16, 2, dp_rank=1, dp_size=2, seed=0), 1)
    got = torch.cat([r0["input_ids"], r1["input_ids"]])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, whole["input_ids"].tolist()))


def test_resume_continues_with_the_next_sample():
    loader = MockDataLoader(100, 16, 2, 0, 1, seed=1)
    first = take(loader, 3)
    state = loader.state_dict()
    resumed = MockDataLoader(100, 16, 2, 0, 1, seed=1)
    resumed.load_state_dict(state)
    straight = take(MockDataLoader(100, 16, 2, 0, 1, seed=1), 4)
    assert torch.equal(take(resumed, 1)[0]["input_ids"], straight[3]["input_ids"])
    assert torch.equal(first[0]["labels"], straight[0]["labels"])


def test_samples_are_packed_documents_with_shifted_labels():
    (batch,) = take(MockDataLoader(1000, 32, 1, 0, 1, seed=0), 1)
    ids, labels, docs = batch["input_ids"][0], batch["labels"][0], batch["document_ids"][0]
    assert set(docs.tolist()) == {0, 1}
    keep = labels != -100
    assert 0 < keep.sum() < 32  # the prompt-like head and the boundary take no loss
    # labels[t] is the token after position t.
    assert torch.equal(labels[:-1][keep[:-1]], ids[1:][keep[:-1]])


def test_prefetching_checkpoints_the_position_of_the_last_batch_taken():
    from meshtron.train.data import PrefetchLoader

    straight = take(MockDataLoader(100, 16, 2, 0, 1, seed=2), 5)
    prefetching = PrefetchLoader(MockDataLoader(100, 16, 2, 0, 1, seed=2), depth=3)
    got = take(prefetching, 2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, straight))
    state = prefetching.state_dict()
    assert state == {"consumed_samples": 4}  # not the batches prepared ahead
    resumed = PrefetchLoader(MockDataLoader(100, 16, 2, 0, 1, seed=2), depth=3)
    resumed.load_state_dict(state)
    assert torch.equal(take(resumed, 1)[0]["input_ids"], straight[2]["input_ids"])
