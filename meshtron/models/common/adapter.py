"""State-dict adapters: our tensors <-> a Hugging Face checkpoint's, converted group by group.

A `TensorGroup` names tensors that convert together, as name templates on both sides, and the
two conversions between their lists of tensors. One-to-one renames are groups of one; a fused
`qkv_proj` is one Hugging Face tensor for three of ours (split on import, concatenated on export);
stacked experts would be many Hugging Face tensors for one of ours. Templates hold `{i}` (a layer
index) and `{rest}` (any suffix); a group's placeholders bind once per instance, so layer 3's q/k/v
are gathered into one instance.

`StateDictAdapter` applies a family's groups, in order (the first group whose template matches a
name takes it), plus the rules of the output head, decided here and nowhere else:
- a tied head (`ModelArgs.head_is_tied`) is not written; it is read from the embedding;
- a score head (`num_labels`, a reward model) is Hugging Face's `score.weight`, and a language
  model's `lm_head.weight` is of no use to it (and the other way round).
Tensors are streamed: `from_hf` consumes (name, tensor) pairs and yields ours as soon as a group
instance is complete, so peak memory is one group beyond the model. The stream may hold lazy tensors
(anything with `shape` and `full()`, e.g. a safetensors entry not read yet): a one-to-one group passes
them through unread, so the caller reads only the part it keeps; a converting group reads its inputs
whole; a group none of whose tensors is `wanted` is not read at all.
"""

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from meshtron.errors import UserError
from meshtron.models.common.args import ModelArgs

Convert = Callable[[list[torch.Tensor]], list[torch.Tensor]]
SCORE_HEAD = "score.weight"  # transformers' *ForSequenceClassification head
LM_HEAD = "lm_head.weight"
EMBED = "embed.weight"


def _same(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


@dataclass(frozen=True)
class TensorGroup:
    ours: tuple[str, ...]
    hf: tuple[str, ...]
    to_hf: Convert = _same
    from_hf: Convert = _same


def _whole(tensor) -> torch.Tensor:
    """A stream's tensor, read whole if it is lazy."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.full()


def renames(pairs: list[tuple[str, str]]) -> list[TensorGroup]:
    """One-to-one groups from (ours, hf) name templates: the tensors that only change their name."""
    return [TensorGroup((ours,), (hf,)) for ours, hf in pairs]


def split_group(ours: tuple[str, ...], hf: str, sizes: list[int], dim: int = 0) -> TensorGroup:
    """Several of our tensors stored as one Hugging Face tensor, concatenated along `dim` (fused qkv, gate_up)."""
    return TensorGroup(ours, (hf,), to_hf=lambda ts: [torch.cat(ts, dim=dim)],
                       from_hf=lambda ts: list(torch.split(ts[0], sizes, dim=dim)))


def _compile(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(f"^{escaped}$")


@dataclass
class _Side:
    """One side's templates of every group, compiled."""

    patterns: list[list[re.Pattern]] = field(default_factory=list)

    def match(self, name: str) -> tuple[int, int, dict] | None:
        """(group index, template index in the group, bound placeholders) of the first match."""
        for g, patterns in enumerate(self.patterns):
            for t, pattern in enumerate(patterns):
                m = pattern.match(name)
                if m:
                    return g, t, m.groupdict()
        return None


class StateDictAdapter:
    def __init__(self, args: ModelArgs, groups: list[TensorGroup], family: str,
                 ignored_hf_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)):
        self.args, self.groups, self.family = args, groups, family
        self.ignored = ignored_hf_suffixes
        self._ours = _Side([[_compile(t) for t in g.ours] for g in groups])
        self._hf = _Side([[_compile(t) for t in g.hf] for g in groups])

    # ---- ours -> Hugging Face ------------------------------------------------------------

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole state dict (our names, full tensors) as Hugging Face tensors."""
        out: dict[str, torch.Tensor] = {}
        grouped = {}
        for name, tensor in state_dict.items():
            if name == LM_HEAD and self.args.head_is_tied:
                continue  # the embedding is the head
            if name == LM_HEAD and self.args.num_labels:
                out[SCORE_HEAD] = tensor
                continue
            grouped[name] = tensor
        for (g, binding), tensors in self._gather(grouped.items(), self._ours, "ours"):
            group = self.groups[g]
            out.update(zip(self._names(group.hf, binding), group.to_hf(tensors)))
        return out

    def hf_name(self, name: str) -> str:
        """The Hugging Face name of one of our tensors that converts one to one (for messages, PEFT)."""
        if name == LM_HEAD and self.args.num_labels:
            return SCORE_HEAD
        found = self._ours.match(name)
        if found is None or len(self.groups[found[0]].ours) != 1 or len(self.groups[found[0]].hf) != 1:
            raise UserError(f"{name} has no one-to-one Hugging Face name in the {self.family} family")
        return self._names(self.groups[found[0]].hf, found[2])[0]

    # ---- Hugging Face -> ours ------------------------------------------------------------

    def from_hf(self, tensors: Iterable[tuple[str, torch.Tensor]],
                wanted: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
        """Our (name, tensor) pairs from a stream of Hugging Face ones, group by group; only groups
        with a `wanted` tensor of ours (e.g. held by this pipeline stage) are yielded, and read."""
        for (g, binding), group_tensors in self._gather(self._hf_kept(tensors), self._hf, "hf"):
            if g is None:  # a score head: ours without conversion
                if wanted(LM_HEAD):
                    yield LM_HEAD, group_tensors[0]
                continue
            group = self.groups[g]
            names = self._names(group.ours, binding)
            if not any(map(wanted, names)):
                continue
            if group.from_hf is not _same:
                group_tensors = group.from_hf([_whole(t) for t in group_tensors])
            yield from zip(names, group_tensors)

    def _hf_kept(self, tensors):
        """Drop recomputed buffers and the head kind this model does not have."""
        unused_head = LM_HEAD if self.args.num_labels else SCORE_HEAD
        for name, tensor in tensors:
            if not (name.endswith(self.ignored) or name == unused_head):
                yield name, tensor

    def head_aliases(self, name: str) -> tuple[str, ...]:
        """Our parameters that receive a loaded tensor: a tied embedding also fills a pipeline stage's
        separate copy of the head."""
        return (name, LM_HEAD) if name == EMBED and self.args.head_is_tied else (name,)

    def optional(self, name: str) -> bool:
        """Whether our parameter may be absent from a Hugging Face checkpoint: the tied head, and a
        score head that a reward model adds to a language model (it starts fresh)."""
        return name == LM_HEAD and (self.args.head_is_tied or bool(self.args.num_labels))

    # ---- shared -----------------------------------------------------------------------------

    def _gather(self, items, side: _Side, which: str):
        """Collect named tensors into group instances; yield each one complete, in template order.
        A score head is yielded alone, as group None."""
        pending: dict[tuple, dict[int, torch.Tensor]] = {}
        for name, tensor in items:
            if name == SCORE_HEAD:
                yield (None, {}), [tensor]
                continue
            found = side.match(name)
            if found is None:
                raise UserError(f"unexpected tensor {name!r} for a {self.family} model")
            g, t, binding = found
            key = (g, tuple(sorted(binding.items())))
            parts = pending.setdefault(key, {})
            parts[t] = tensor
            if len(parts) == len(side.patterns[g]):
                del pending[key]
                yield (g, binding), [parts[k] for k in range(len(parts))]
        if pending:
            (g, binding), parts = next(iter(pending.items()))
            templates = self.groups[g].hf if which == "hf" else self.groups[g].ours
            missing = [n for k, n in enumerate(self._names(templates, dict(binding))) if k not in parts]
            raise UserError(f"incomplete tensor group: {', '.join(missing)} missing beside the tensors it is "
                            "converted with")

    @staticmethod
    def _names(templates: tuple[str, ...], binding: dict) -> list[str]:
        return [t.format(**binding) for t in templates]
