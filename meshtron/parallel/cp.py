"""Context parallel: each sequence split over the cp ranks, attention computed across them.

Layout (load-balanced, Megatron-LM's and torch's head-tail): a sequence is cut into 2 x cp chunks
and cp rank r holds chunks r and 2 x cp - 1 - r, so that under a causal mask every rank has the
same attention work. Tokens, labels, position ids and document ids are split alike when a batch
is prepared (`ContextParallel.shard_batch`); the batch's mask then carries a `ContextShard` (the
whole sequence's description and this rank's place in it) and `masks.attend` hands attention to it.

Algorithms (`parallel.cp_algo`):
- ring: key/value blocks rotate around the ranks (P2P; the next block's transfer overlaps this
  block's attention). Each block is computed with its log-sum-exp and the blocks merge exactly;
  blocks that the mask leaves empty (the future, beyond the window) are skipped. The
  backward rotates the blocks again and sends each block's key/value gradients home with it.
- ulysses: all-to-all from sequence shards to head shards, the model's own attention backend over
  the whole sequence, all-to-all back. Key/value heads are repeated when fewer than the degree.
- hybrid: Ulysses inside groups of `cp_ulysses` neighbouring cp ranks, ring across the groups.

Shapes: B batch, H query heads, G key/value heads, R = H / G, S local sequence, L chunk length,
D head_dim. The ring's block kernel is plain math (the scores of up to ROW_TILE queries of one chunk
against one chunk of keys at a time), in float32 (or the inputs' dtype if wider), the same on every device: torch's CUDA-only ring (`context_parallel`) is not used.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.utils._pytree as pytree

from meshtron.errors import UserError

CP_ALGOS = ("ring", "ulysses", "hybrid")
# Queries per ring block: a block's scores are B x H x ROW_TILE x (S / 2cp) floats at most.
ROW_TILE = 1024


def ulysses_degree(cp: int, algo: str, cp_ulysses: int) -> int:
    """The Ulysses degree inside cp (the ring degree is cp / it), checked."""
    if algo not in CP_ALGOS:
        raise UserError(f"parallel.cp_algo = {algo!r} is not one of {', '.join(CP_ALGOS)}")
    if algo != "hybrid":
        if cp_ulysses not in (0, 1 if algo == "ring" else cp):
            raise UserError(f"parallel.cp_ulysses = {cp_ulysses} applies to cp_algo = hybrid only; remove it or set "
                            "parallel.cp_algo = \"hybrid\"")
        return 1 if algo == "ring" else cp
    if not (1 < cp_ulysses < cp and cp % cp_ulysses == 0):
        raise UserError(f"parallel.cp_algo = hybrid needs parallel.cp_ulysses strictly between 1 and cp = {cp} and "
                        f"dividing it (got {cp_ulysses}); e.g. cp = 4, cp_ulysses = 2")
    return cp_ulysses


def check_model(cp: int, ulysses: int, num_heads: int, seq_length: int) -> None:
    """What the layout needs of the model and the sequence; `num_heads` per tensor-parallel rank."""
    if seq_length % (2 * cp):
        raise UserError(f"train.seq_length ({seq_length}) is not divisible by 2 x parallel.cp = {2 * cp} (context "
                        "parallel cuts each sequence into 2 x cp equal chunks); change one of them")
    if num_heads % ulysses:
        raise UserError(f"the model's attention heads per tensor-parallel rank ({num_heads}) are not divisible by "
                        f"the Ulysses degree {ulysses}; use parallel.cp_algo = ring, or a hybrid with a "
                        "parallel.cp_ulysses that divides them")


def chunks_of(cp_rank: int, cp: int) -> tuple[int, int]:
    """The head-tail layout: the chunks (of 2 x cp) that a cp rank holds, in the order it holds them."""
    return cp_rank, 2 * cp - 1 - cp_rank


@dataclass(frozen=True)
class Axis:
    """One process group of the layout and this process's place in it (size 1: no group)."""

    group: object = None
    size: int = 1
    rank: int = 0

    @classmethod
    def of(cls, mesh) -> "Axis":
        return cls(mesh.get_group(), mesh.size(), mesh.get_local_rank())


class ContextParallel:
    """This process's cp ranks: all of them (`cp`), the Ulysses group inside and the ring across.

    A cp rank is ring_rank x ulysses + ulysses_rank (Ulysses groups are neighbours)."""

    def __init__(self, cp: Axis, ring: Axis, ulysses: Axis):
        assert cp.size == ring.size * ulysses.size
        self.cp, self.ring, self.ulysses = cp, ring, ulysses

    @classmethod
    def from_meshes(cls, meshes) -> "ContextParallel":
        ring, ulysses = (Axis.of(mesh) if mesh is not None else Axis() for mesh in (meshes.cp_ring, meshes.cp_ulysses))
        return cls(Axis.of(meshes.cp), ring, ulysses)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's chunks of x (B, S, ...) along the sequence (dim 1)."""
        B, S = x.shape[:2]
        chunks = x.reshape(B, 2 * self.cp.size, S // (2 * self.cp.size), *x.shape[2:])
        return chunks[:, list(chunks_of(self.cp.rank, self.cp.size))].flatten(1, 2)

    def shard_batch(self, batch: dict) -> dict:
        """A prepared batch (`Recipe.prepare_batch`) cut to this rank: every (B, S) tensor, and the mask
        replaced by one that says where this rank's queries sit in the whole sequence."""
        from meshtron.models.common.masks import AttentionMask

        full = batch["mask"]
        B, S = batch["input_ids"].shape[:2]
        sharded = {k: self.shard(v) if isinstance(v, torch.Tensor) and v.shape[:2] == (B, S) else v
                   for k, v in batch.items()}
        local = S // self.cp.size
        sharded["mask"] = AttentionMask(local, local, backend=full.backend, context=ContextShard(self, full))
        return sharded

    def sum_sequences(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums of this rank's part of the sequences (e.g. log-probs (B,)) summed over the cp
        ranks, differentiably: each rank's part gets the gradient of the whole sum (the all-gather's
        backward reduce-scatters), for losses that are not sums over tokens (preference losses)."""
        gathered = funcol.all_gather_tensor_autograd(t.unsqueeze(0).contiguous(), gather_dim=0,
                                                     group=self.cp.group)
        return funcol.wait_tensor(gathered).sum(0)

    def ring_chunks(self) -> list[list[int]]:
        """The chunks each ring rank holds while the ring runs: those of its Ulysses group, in group order."""
        u, cp = self.ulysses.size, self.cp.size
        return [[c for i in range(u) for c in chunks_of(j * u + i, cp)] for j in range(self.ring.size)]


class ContextShard:
    """Attached to a cp rank's mask: the whole sequence's description (`full`, an AttentionMask) and
    the ranks. A plain class, not a dataclass, so that FSDP's copies of the mask share it."""

    def __init__(self, cp: ContextParallel, full):
        self.cp, self.full = cp, full

    def _flatten(self):
        return [self.full], self.cp

    @classmethod
    def _unflatten(cls, children, cp: ContextParallel) -> "ContextShard":
        return cls(cp, children[0])

    def attend(self, q_BHSD, k_BGSD, v_BGSD, window: int | None, scale: float | None,
               softcap: float | None) -> torch.Tensor:
        scale = scale if scale is not None else q_BHSD.shape[-1] ** -0.5
        u = self.cp.ulysses
        if u.size == 1:
            return self._ring(q_BHSD, k_BGSD, v_BGSD, window, scale, softcap)
        k_BGSD, v_BGSD = _repeat_kv(k_BGSD, v_BGSD, q_BHSD.shape[1], u.size)
        q, k, v = (_seq_to_heads(t, u) for t in (q_BHSD, k_BGSD, v_BGSD))
        if self.cp.ring.size > 1:
            out = self._ring(q, k, v, window, scale, softcap)
        else:
            out = self._whole(q, k, v, window, scale, softcap)
        return _heads_to_seq(out, u)

    def _ring(self, q, k, v, window, scale, softcap) -> torch.Tensor:
        L = self.full.q_len // (2 * self.cp.cp.size)
        plan = RingPlan(self.cp.ring, self.cp.ring_chunks(), L, self.full.document_ids, window, scale, softcap,
                        q.device)
        return RingAttention.apply(q, k, v, plan)

    def _whole(self, q_BHSD, k_BGSD, v_BGSD, window, scale, softcap) -> torch.Tensor:
        """Pure Ulysses: the whole sequence (the chunks back in their order) through the run's backend."""
        from meshtron.models.common.masks import attend

        held = self.cp.ring_chunks()[0]  # every chunk, in the order the all-to-all left them
        order = sorted(range(len(held)), key=held.__getitem__)

        def reorder(t, index):
            B, X, S, D = t.shape
            return t.view(B, X, len(held), S // len(held), D)[:, :, index].reshape(B, X, S, D)

        out = attend(*(reorder(t, order) for t in (q_BHSD, k_BGSD, v_BGSD)), self.full, window, self.full.backend,
                     scale, softcap)
        return reorder(out, held)


# A pytree (its child the whole sequences' mask description), so that the pipeline schedule splits a
# step's description into its micro-batches' as it does without context parallel.
pytree.register_pytree_node(ContextShard, ContextShard._flatten, ContextShard._unflatten,
                            serialized_type_name="meshtron.parallel.cp.ContextShard")


def _repeat_kv(k_BGSD, v_BGSD, num_heads: int, degree: int):
    """Key/value heads repeated so that the Ulysses degree divides them (each rank needs the key/value
    heads of its query heads): to lcm(G, degree), which divides H since G and degree do."""
    G = k_BGSD.shape[1]
    if G % degree == 0:
        return k_BGSD, v_BGSD
    repeats = math.lcm(G, degree) // G
    assert num_heads % (G * repeats) == 0
    return k_BGSD.repeat_interleave(repeats, dim=1), v_BGSD.repeat_interleave(repeats, dim=1)


def _all_to_all(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Differentiable all-to-all over dim 0 (one slice per rank of `axis`)."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), None, None, axis.group))


def _seq_to_heads(x_BXSD: torch.Tensor, axis: Axis) -> torch.Tensor:
    """(B, X, S, D) with this rank's sequence -> (B, X / n, n x S, D) with its heads over the group's
    sequences (in group order)."""
    B, X, S, D = x_BXSD.shape
    n = axis.size
    out = _all_to_all(x_BXSD.reshape(B, n, X // n, S, D).transpose(0, 1), axis)  # (n source ranks, B, X/n, S, D)
    return out.permute(1, 2, 0, 3, 4).reshape(B, X // n, n * S, D)


def _heads_to_seq(y_BXSD: torch.Tensor, axis: Axis) -> torch.Tensor:
    """The inverse of `_seq_to_heads`."""
    B, X, nS, D = y_BXSD.shape
    n = axis.size
    out = _all_to_all(y_BXSD.reshape(B, X, n, nS // n, D).permute(2, 0, 1, 3, 4), axis)  # (n head groups, B, X, S, D)
    return out.transpose(0, 1).reshape(B, n * X, nS // n, D)


@dataclass(frozen=True)
class RingPlan:
    """What one ring attention call needs besides q, k, v: the ring, the chunks each ring rank holds
    (chunk length `L`), and the mask: causal, the whole sequence's document ids (B, S_full) or None,
    this layer's window; the score scale and soft-cap."""

    axis: Axis
    chunks: list[list[int]]
    L: int
    document_ids: torch.Tensor | None
    window: int | None
    scale: float
    softcap: float | None
    device: torch.device

    def visible(self, q_start: int, q_len: int, k_start: int, k_len: int):
        """What the queries at global positions q_start.. see of the keys at k_start..: False (nothing),
        None (everything) or a boolean mask (B or 1, 1, 1, q_len, k_len) that broadcasts over heads."""
        newest_gap = q_start + q_len - 1 - k_start  # the largest query - key distance
        oldest_gap = q_start - (k_start + k_len - 1)  # the smallest
        if newest_gap < 0 or (self.window is not None and oldest_gap >= self.window):
            return False
        if oldest_gap >= 0 and (self.window is None or newest_gap < self.window) and self.document_ids is None:
            return None
        q_pos = torch.arange(q_start, q_start + q_len, device=self.device)
        k_pos = torch.arange(k_start, k_start + k_len, device=self.device)
        mask = (k_pos[None] <= q_pos[:, None])[None]
        if self.window is not None:
            mask = mask & (k_pos[None] > q_pos[:, None] - self.window)[None]
        if self.document_ids is not None:
            docs = self.document_ids
            mask = mask & (docs[:, q_pos, None] == docs[:, None, k_pos])
        if not bool(mask.any()):
            return False
        return mask[:, None, None]

    def pairs(self, src: int):
        """(query slice, key slice, mask) of each block between this rank's queries and the keys of ring
        rank `src` with anything visible: a tile of at most ROW_TILE queries of one chunk against one
        chunk of keys, so that a block's scores stay small however long the chunks are."""
        L, tile = self.L, min(self.L, ROW_TILE)
        for qi, qc in enumerate(self.chunks[self.axis.rank]):
            for row in range(0, L, tile):
                rows = min(tile, L - row)
                for ki, kc in enumerate(self.chunks[src]):
                    mask = self.visible(qc * L + row, rows, kc * L, L)
                    if mask is not False:
                        yield slice(qi * L + row, qi * L + row + rows), slice(ki * L, (ki + 1) * L), mask


class _Shift:
    """Send a tensor to the next ring rank and receive the previous one's, asynchronously."""

    def __init__(self, t: torch.Tensor, axis: Axis):
        self.received = torch.empty_like(t)
        self.requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, t.contiguous(), group=axis.group, group_peer=(axis.rank + 1) % axis.size),
            dist.P2POp(dist.irecv, self.received, group=axis.group, group_peer=(axis.rank - 1) % axis.size),
        ])

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        return self.received


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp with -inf (rows that see nothing yet) as 0, so that exp(score - it) is 0 there."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _acc(t: torch.Tensor) -> torch.dtype:
    """The dtype blocks are computed and merged in: float32, or the inputs' if wider."""
    return torch.promote_types(t.dtype, torch.float32)


# A block's (B, G, R, Lq, Lk) temporaries are the ring's transient memory: they are updated in place
# (the forward and backward of RingAttention run without autograd), so that one or two exist at a time.

def _scores(q, k, plan: RingPlan, mask):
    """Scores (B, G, R, Lq, Lk) in `_acc`, soft-capped where the family does (and tanh for the backward)."""
    s = torch.einsum("bgrqd,bgkd->bgrqk", q.to(_acc(q)), k.to(_acc(q))).mul_(plan.scale)
    capped = None
    if plan.softcap is not None:
        capped = s.div_(plan.softcap).tanh_()
        s = capped * plan.softcap
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return s, capped


def _probabilities(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(scores - log-sum-exp), in the scores' storage."""
    return s.sub_(_finite(lse)[..., None]).exp_()


def _block_forward(q, k, v, plan: RingPlan, mask):
    s, _ = _scores(q, k, plan, mask)
    lse = torch.logsumexp(s, dim=-1)
    p = _probabilities(s, lse)
    return torch.einsum("bgrqk,bgkd->bgrqd", p, v.to(p.dtype)), lse


def _merge(out, lse, block_out, block_lse) -> None:
    """out, lse (accumulated so far, in place) merged with one block's: the exact softmax over both."""
    new = torch.logaddexp(lse, block_lse)
    safe = _finite(new)
    out.mul_(torch.exp(lse - safe)[..., None]).add_(block_out * torch.exp(block_lse - safe)[..., None])
    lse.copy_(new)


def _block_backward(dout, delta, q, k, v, lse, plan: RingPlan, mask):
    """Gradients of one block from the merged output's (softmax of the block's scores taken against the
    merged log-sum-exp, so that the blocks' gradients add up to the whole attention's)."""
    s, capped = _scores(q, k, plan, mask)
    p = _probabilities(s, lse)
    dv = torch.einsum("bgrqk,bgrqd->bgkd", p, dout)
    ds = torch.einsum("bgrqd,bgkd->bgrqk", dout, v.to(p.dtype)).sub_(delta[..., None]).mul_(p)
    del p, s
    if capped is not None:
        ds.mul_(capped.square_().neg_().add_(1))
    ds.mul_(plan.scale)
    return (torch.einsum("bgrqk,bgkd->bgrqd", ds, k.to(ds.dtype)), torch.einsum("bgrqk,bgrqd->bgkd", ds, q.to(ds.dtype)),
            dv)


class RingAttention(torch.autograd.Function):
    """q (B, H, S, D), k (B, G, S, D) and v (B, G, S, Dv) -> out (B, H, S, Dv), attention over the whole
    ring (Dv: the value head size, which multi-head latent attention sets apart from D)."""

    @staticmethod
    def forward(ctx, q_BHSD, k_BGSD, v_BGSD, plan: RingPlan):
        B, H, S, D = q_BHSD.shape
        G, Dv = k_BGSD.shape[1], v_BGSD.shape[-1]
        q = q_BHSD.view(B, G, H // G, S, D)
        out = torch.zeros(B, G, H // G, S, Dv, dtype=_acc(q), device=q.device)
        lse = torch.full((B, G, H // G, S), float("-inf"), dtype=_acc(q), device=q.device)
        kv = _pack(k_BGSD, v_BGSD)
        for step, src in _ring_steps(plan.axis):
            shift = _Shift(kv, plan.axis) if step < plan.axis.size - 1 else None
            k, v = _unpack(kv, D)
            for qs, ks, mask in plan.pairs(src):
                block_out, block_lse = _block_forward(q[..., qs, :], k[..., ks, :], v[..., ks, :], plan, mask)
                _merge(out[..., qs, :], lse[..., qs], block_out, block_lse)
            if shift is not None:
                kv = shift.wait()
        ctx.plan = plan
        ctx.save_for_backward(q_BHSD, k_BGSD, v_BGSD, out, lse)
        return out.view(B, H, S, Dv).to(q_BHSD.dtype)

    @staticmethod
    def backward(ctx, dout_BHSD):
        q_BHSD, k_BGSD, v_BGSD, out, lse = ctx.saved_tensors
        plan = ctx.plan
        B, H, S, D = q_BHSD.shape
        G = k_BGSD.shape[1]
        q = q_BHSD.view(B, G, H // G, S, D)
        dout = dout_BHSD.reshape(out.shape).to(out.dtype)
        delta = (dout * out).sum(-1)
        dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)
        kv = _pack(k_BGSD, v_BGSD)
        dkv = torch.zeros(kv.shape, dtype=out.dtype, device=kv.device)  # travels with the block it belongs to
        for step, src in _ring_steps(plan.axis):
            shift = _Shift(kv, plan.axis) if step < plan.axis.size - 1 else None
            (k, v), (dk, dv) = _unpack(kv, D), _unpack(dkv, D)
            for qs, ks, mask in plan.pairs(src):
                dq_blk, dk_blk, dv_blk = _block_backward(dout[..., qs, :], delta[..., qs], q[..., qs, :],
                                                         k[..., ks, :], v[..., ks, :], lse[..., qs], plan, mask)
                dq[..., qs, :] += dq_blk
                dk[..., ks, :] += dk_blk
                dv[..., ks, :] += dv_blk
            if plan.axis.size > 1:
                dkv = _Shift(dkv, plan.axis).wait()  # after `size` shifts each block's gradient is home
            if shift is not None:
                kv = shift.wait()
        dk, dv = _unpack(dkv, D)
        return dq.view(B, H, S, D).to(q_BHSD.dtype), dk.to(k_BGSD.dtype), dv.to(v_BGSD.dtype), None


def _pack(k_BGSD: torch.Tensor, v_BGSD: torch.Tensor) -> torch.Tensor:
    """k and v side by side along the last dim (their head sizes may differ): one message per ring step."""
    return torch.cat([k_BGSD, v_BGSD], dim=-1)


def _unpack(kv: torch.Tensor, key_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of k and v in a `_pack`ed tensor."""
    return kv[..., :key_dim], kv[..., key_dim:]


def _ring_steps(axis: Axis):
    """(step, ring rank whose keys/values this rank holds at that step)."""
    return ((step, (axis.rank - step) % axis.size) for step in range(axis.size))
