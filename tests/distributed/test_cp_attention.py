"""The context-parallel attention op itself (meshtron.parallel.cp), on 4 gloo processes: forward and
gradients of ring (cp = 4, and cp = 2 in two groups), Ulysses (cp = 4, fewer key/value heads than
ranks) and hybrid (2 x 2) against one process's attention over the whole sequence (SDPA under the
dense mask), for causal packed documents with a sliding window, grouped-query heads, a soft-cap and
value heads wider than key heads; ring blocks tiled smaller than a chunk.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meshtron.models.common.masks import AttentionMask, attend
from meshtron.parallel import cp
from meshtron.parallel.cp import Axis, ContextParallel

WORLD = 4
B, H, G, S, D = 2, 4, 2, 32, 8
CASES = [  # (cp algo, ring size, ulysses size, window, softcap, value head size)
    ("ring", 4, 1, None, None, D),
    ("ring", 4, 1, 7, None, D),
    ("ring", 4, 1, None, 5.0, D),
    ("ring", 2, 1, 11, None, 12),  # two rings of 2 (ranks {0, 1} and {2, 3}); values wider than keys (MLA)
    ("ulysses", 1, 4, 7, None, D),
    ("ulysses", 1, 4, None, 5.0, D),
    ("hybrid", 2, 2, None, None, D),
    ("hybrid", 2, 2, 11, None, 12),
]


def _inputs(value_dim: int):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, S, d, generator=gen) for n, d in ((H, D), (G, D), (G, value_dim)))
    dout = torch.randn(B, H, S, value_dim, generator=gen)
    # Row 0: documents of 5, 14 and 13 tokens; row 1: one document.
    document_ids = torch.tensor([[0] * 5 + [1] * 14 + [2] * 13, [0] * S])
    return q, k, v, dout, document_ids


def _groups(size: int, rank: int) -> Axis:
    """Consecutive groups of `size` ranks (every rank creates every group, as torch requires)."""
    mine = None
    for start in range(0, WORLD, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = Axis(group, size, rank - start)
    return mine


def _layout(rank: int, ring: int, ulysses: int) -> ContextParallel:
    cp_axis = _groups(ring * ulysses, rank)
    ring_ranks = [[base + j * ulysses + i for j in range(ring)] for base in range(0, WORLD, ring * ulysses)
                  for i in range(ulysses)]
    ring_axis = Axis()
    for ranks in ring_ranks:
        group = dist.new_group(ranks)
        if rank in ranks and ring > 1:
            ring_axis = Axis(group, ring, ranks.index(rank))
    return ContextParallel(cp_axis, ring_axis, _groups(ulysses, rank) if ulysses > 1 else Axis())


def _worker(rank: int, port: int, failures):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # Ring blocks of 3 queries: tiles that end inside chunks (4 or 8 tokens here) and chunks of several tiles.
    cp.ROW_TILE = 3
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for algo, ring, ulysses, window, softcap, value_dim in CASES:
            q, k, v, dout, docs = _inputs(value_dim)
            layout = _layout(rank, ring, ulysses)
            full = AttentionMask.for_batch(S, docs)
            ref = [t.clone().requires_grad_() for t in (q, k, v)]
            expected = attend(*ref, full, window, "dense", softcap=softcap)
            expected.backward(dout)
            batch = {"input_ids": torch.zeros(B, S, dtype=torch.long), "mask": full}
            local_mask = layout.shard_batch(batch)["mask"]
            mine = [layout.shard(t.transpose(1, 2)).transpose(1, 2).clone().requires_grad_() for t in (q, k, v)]
            out = attend(*mine, local_mask, window, "auto", softcap=softcap)
            out.backward(layout.shard(dout.transpose(1, 2)).transpose(1, 2))
            pairs = [(name, got, layout.shard(want.transpose(1, 2)).transpose(1, 2)) for name, got, want in
                     [("out", out, expected), *((f"grad {n}", t.grad, r.grad) for n, t, r in zip("qkv", mine, ref))]]
            # float32 rounding differs between the block-wise math and SDPA (about 1e-6 here); a wrong
            # mask or merge differs by the size of the values (0.1 to 1).
            for what, got, want in pairs:
                if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                    failures.put(f"{algo} ring={ring} ulysses={ulysses} window={window} softcap={softcap} "
                                 f"value_dim={value_dim} rank {rank}: "
                                 f"{what} differs by {(got - want).abs().max().item():.3g}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cp_attention_matches_one_process_forward_and_gradients():
    ctx = mp.get_context("spawn")
    failures = ctx.Queue()
    mp.start_processes(_worker, args=(_free_port(), failures), nprocs=WORLD, start_method="spawn")
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert not found, "\n".join(found)
