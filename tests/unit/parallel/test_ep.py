"""The reordering of expert parallel's dispatch: rows received grouped by (source rank, local expert) are
regrouped by (local expert, source rank), each chunk's rows kept in order."""

import torch

from meshtron.parallel.ep import local_expert_order


def test_rows_regroup_by_local_expert_then_source():
    counts_PL = torch.tensor([[2, 0, 1], [1, 3, 0]])  # 2 source ranks, 3 local experts
    # received rows, labelled (source, expert, index within the chunk)
    rows = [(p, l, i) for p in range(2) for l in range(3) for i in range(int(counts_PL[p, l]))]
    order = local_expert_order(counts_PL)
    assert [rows[k] for k in order.tolist()] == sorted(rows, key=lambda r: (r[1], r[0], r[2]))


def test_nothing_received():
    assert local_expert_order(torch.zeros(2, 2, dtype=torch.int64)).numel() == 0
