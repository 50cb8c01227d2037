"""Sample datasets and the resumable loader (on small indexed files written directly)."""

import numpy as np
import pytest
import torch

from meshtron.data import indexed
from meshtron.data.loader import DataLoader, build_dataset
from meshtron.data.samples import BlendedDataset
from meshtron.errors import UserError

EOD = 2


def write_corpus(prefix, num_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(3, 1000, size=rng.integers(1, 30)), EOD) for _ in range(num_docs)]
    with indexed.IndexedWriter(prefix, np.uint16) as w:
        for doc in docs:
            w.add_document([doc])
    return np.concatenate(docs)


def test_pretrain_windows_cross_documents_and_keep_boundaries(tmp_path):
    stream = write_corpus(str(tmp_path / "c_text_document"))
    S = 16
    ds = build_dataset([str(tmp_path / "c")], None, S, "pretrain", seed=0)
    assert len(ds) == (len(stream) - 1) // S
    for i in range(len(ds)):
        s = ds[i]
        np.testing.assert_array_equal(s["input_ids"], stream[i * S : i * S + S])
        np.testing.assert_array_equal(s["labels"], stream[i * S + 1 : i * S + S + 1])
        # A new document starts right after every EOD, and only there.
        changes = s["document_ids"][1:] != s["document_ids"][:-1]
        np.testing.assert_array_equal(changes, s["input_ids"][:-1] == EOD)
        np.testing.assert_array_equal(s["position_ids"], np.arange(S))
    reset = build_dataset([str(tmp_path / "c_text_document")], None, S, "pretrain", seed=0, reset_position_ids=True)
    s = reset[3]
    starts = np.flatnonzero(np.r_[True, s["input_ids"][:-1] == EOD])
    assert (s["position_ids"][starts] == 0).all()
    assert (np.diff(s["position_ids"])[~np.isin(np.arange(1, S), starts)] == 1).all()


def test_sft_rows_pad_shift_and_separate_packed_samples(tmp_path):
    p = str(tmp_path / "s")
    samples = [([5, 6, 7, 8], [-100, -100, 7, 8]), ([9, 10, 11], [-100, 10, 11]), ([12, 13], [-100, 13])]
    with indexed.IndexedWriter(f"{p}_packed_input_ids_document", np.uint16) as ids, \
            indexed.IndexedWriter(f"{p}_packed_labels_document", np.int32) as labels:
        ids.add_document([samples[0][0], samples[1][0]])  # a pack of two samples
        labels.add_document([samples[0][1], samples[1][1]])
        ids.add_document([samples[2][0]])
        labels.add_document([samples[2][1]])
    ds = build_dataset([p], None, 10, "sft", seed=0)
    assert len(ds) == 2
    row = ds[0]
    assert row["input_ids"].tolist() == [5, 6, 7, 8, 9, 10, 11, 0, 0, 0]
    # target of t is stored label t+1; none across the sample boundary or into padding
    assert row["labels"].tolist() == [-100, 7, 8, -100, 10, 11, -100, -100, -100, -100]
    assert row["document_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    with pytest.raises(UserError, match="packed to 7 tokens"):
        build_dataset([p], None, 6, "sft", seed=0)


def global_stream(dataset, mbs, dp, rounds, state=None):
    """Samples (first input token + row index) in global order, rebuilt from every rank's batches."""
    loaders = [DataLoader(dataset, mbs, r, dp, seed=7) for r in range(dp)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    iters = [iter(loader) for loader in loaders]
    order = []
    for _ in range(rounds):
        batches = [next(it) for it in iters]
        for j in range(mbs):
            for r in range(dp):
                order.append(batches[r]["input_ids"][j].tolist())
    return order, loaders[0].state_dict()


@pytest.mark.parametrize("resume_mbs,resume_dp", [(2, 2), (1, 4), (4, 1), (3, 2)])
def test_resume_continues_exactly_at_any_dp_size(tmp_path, resume_mbs, resume_dp):
    write_corpus(str(tmp_path / "c_text_document"), num_docs=60)
    ds = build_dataset([str(tmp_path / "c")], None, 8, "pretrain", seed=0)
    # 48 samples per round set; run through an epoch boundary.
    full, _ = global_stream(ds, 1, 1, 3 * len(ds) // 2)
    first, state = global_stream(ds, 2, 2, 5)
    assert state["consumed_samples"] == 20
    assert first == full[:20]
    rest, _ = global_stream(ds, resume_mbs, resume_dp, 24, state=state)
    assert rest == full[20 : 20 + len(rest)]


def test_order_depends_on_seed_and_covers_each_epoch_once(tmp_path):
    write_corpus(str(tmp_path / "c_text_document"))
    ds = build_dataset([str(tmp_path / "c")], None, 8, "pretrain", seed=0)
    it = iter(DataLoader(ds, len(ds), 0, 1, seed=1))
    epoch0, epoch1 = next(it)["input_ids"], next(it)["input_ids"]
    every = torch.stack([torch.from_numpy(ds[i]["input_ids"]) for i in range(len(ds))])
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(epoch0) == key(every) == key(epoch1)
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(next(iter(DataLoader(ds, len(ds), 0, 1, seed=1)))["input_ids"], epoch0)
    assert not torch.equal(next(iter(DataLoader(ds, len(ds), 0, 1, seed=2)))["input_ids"], epoch0)
    unshuffled = next(iter(DataLoader(ds, 3, 0, 1, seed=1, shuffle=False)))["input_ids"]
    assert torch.equal(unshuffled, every[:3])
    batch = next(iter(DataLoader(ds, 2, 0, 1, seed=1)))
    assert set(batch) == {"input_ids", "labels", "document_ids", "position_ids"}
    assert all(v.dtype == torch.long and v.shape == (2, 8) for v in batch.values())


class Numbers:
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert 0 <= i < self.n
        return (self.name, i)


def test_blend_follows_weights_and_oversamples_by_permutation():
    big, small = Numbers("big", 300), Numbers("small", 20)
    blend = BlendedDataset([big, small], [0.5, 0.5], seed=3)
    assert len(blend) == 320
    items = [blend[i] for i in range(len(blend))]
    assert sum(1 for name, _ in items if name == "small") == 160
    # Spread evenly: every window of 32 holds about half of each.
    window = [name for name, _ in items[:32]]
    assert 14 <= window.count("small") <= 18
    small_seen = [i for name, i in items if name == "small"]
    assert sorted(small_seen[:20]) == list(range(20)) and sorted(small_seen[20:40]) == list(range(20))
    assert [blend[i] for i in range(len(blend))] == [BlendedDataset([big, small], [0.5, 0.5], 3)[i] for i in range(320)]


def test_build_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="unknown data kind"):
        build_dataset(["x"], None, 8, "rlhf", 0)
    with pytest.raises(UserError, match="no indexed dataset"):
        build_dataset([str(tmp_path / "missing")], None, 8, "pretrain", 0)
    write_corpus(str(tmp_path / "c_text_document"), num_docs=2)
    with pytest.raises(UserError, match="one weight per prefix"):
        build_dataset([str(tmp_path / "c")] * 2, [1.0], 8, "pretrain", 0)
    with pytest.raises(UserError, match="fewer than seq_length"):
        build_dataset([str(tmp_path / "c")], None, 4096, "pretrain", 0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_loader_state_round_trips_through_dcp(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.stateful import Stateful

    write_corpus(str(tmp_path / "c_text_document"))
    ds = build_dataset([str(tmp_path / "c")], None, 8, "pretrain", seed=0)
    loader = DataLoader(ds, 2, 0, 1, seed=5)
    assert isinstance(loader, Stateful)
    it = iter(loader)
    for _ in range(3):
        next(it)
    dcp.save({"data": loader}, checkpoint_id=str(tmp_path / "ckpt"))
    expected = next(it)
    resumed = DataLoader(ds, 2, 0, 1, seed=5)
    dcp.load({"data": resumed}, checkpoint_id=str(tmp_path / "ckpt"))
    assert resumed.consumed_samples == 6
    assert torch.equal(next(iter(resumed))["input_ids"], expected["input_ids"])
