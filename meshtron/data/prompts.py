"""Prompt data of the online RL recipes: JSON lines (or any record format of `meshtron preprocess`)
with `prompt` (a string, sent as one user turn through the chat template) or `messages` (a
conversation to continue), plus any other fields, which the reward functions receive (e.g.
`answer`, `tests`).

Prompts are read and tokenized whole at start-up (prompt sets are small). The loader hands each
optimizer step `rl.prompts_per_step` prompts from a seeded shuffle of the set (a new shuffle per
pass), rank r taking the r-th equal share; its checkpointed state is the number of prompts
consumed, so a resumed run continues with the next unseen prompts.
"""

import logging
from dataclasses import dataclass

import numpy as np
from torch.distributed.checkpoint.stateful import Stateful

from meshtron.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    prompt: str | list  # what the reward functions get: the `prompt` string, or the `messages`
    fields: dict  # the record's other fields
    token_ids: list[int]  # the conversation through the chat template, up to the assistant's turn


def _messages(record: dict) -> list[dict]:
    """The conversation of a record; raises BadRecord saying what is wrong."""
    from meshtron.data.handlers import BadRecord

    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return [{"role": "user", "content": record["prompt"]}]
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return messages
    raise BadRecord("needs 'prompt' (a non-empty string) or 'messages' (a list of {\"role\", \"content\"} objects)")


def read_prompts(paths: list[str], tokenizer, data) -> list[Prompt]:
    """Every good record of `paths`; a bad one stops with its file and line (or is skipped and
    counted with `data.skip_bad_lines`), as the preprocess handlers report theirs."""
    from meshtron.data.handlers import BadRecord
    from meshtron.data.preprocess import Stats, _bad
    from meshtron.data.sources import discover, plan_units, read_unit
    from meshtron.infer.loading import encode_messages

    stats, prompts = Stats(), []
    units, _ = plan_units(discover(paths), 1)
    for unit in units:
        for where, record, error in read_unit(unit):
            try:
                if error is not None:
                    raise BadRecord(error)
                messages = _messages(record)
                token_ids = encode_messages(tokenizer, messages)
            except (BadRecord, UserError) as e:
                _bad(data, stats, where, str(e))
                continue
            key = "prompt" if "prompt" in record else "messages"
            prompts.append(Prompt(record[key], {k: v for k, v in record.items() if k not in ("prompt", "messages")},
                                  token_ids))
    if stats.skipped:
        log.warning("prompt data: skipped %d bad records (%s)", sum(stats.skipped.values()),
                    "; ".join(f"{kind}: {', '.join(stats.examples[kind])}" for kind in stats.skipped))
    if not prompts:
        raise UserError(f"no prompts in {', '.join(paths)}")
    return prompts


class PromptLoader(Stateful):
    """This rank's prompts of each step, as (position in the run's stream of prompts, prompt)."""

    def __init__(self, prompts: list[Prompt], per_step: int, dp_rank: int, dp_size: int, seed: int):
        if per_step % dp_size:
            raise UserError(f"rl.prompts_per_step ({per_step}) must be a multiple of the data-parallel size "
                            f"({dp_size}): each rank rolls out an equal share of whole groups")
        self.prompts, self.per_step, self.seed = prompts, per_step, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_prompts = 0
        self._orders: dict[int, np.ndarray] = {}  # the shuffle of each pass over the prompts

    def _at(self, position: int) -> Prompt:
        epoch, index = divmod(position, len(self.prompts))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))}
        return self.prompts[self._orders[epoch][index]]

    def __iter__(self):
        while True:
            share = self.per_step // self.dp_size
            start = self.consumed_prompts + self.dp_rank * share
            self.consumed_prompts += self.per_step
            yield [(start + i, self._at(start + i)) for i in range(share)]

    def state_dict(self) -> dict:
        return {"consumed_prompts": self.consumed_prompts}

    def load_state_dict(self, state_dict: dict) -> None:
        self.consumed_prompts = int(state_dict["consumed_prompts"])
