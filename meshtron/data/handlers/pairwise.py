"""`pairwise`: a prompt with a chosen and a rejected response (DPO, SimPO, reward models).

Alpaca-shaped: {"instruction", "input"?, "system"?, "history"?, "chosen": str, "rejected": str}.
ShareGPT-shaped: {"conversations": [...], "chosen": {"from": "gpt", "value"} | str, "rejected": ... }.
Each side is rendered as prompt + response through the chat template, with the loss
on the assistant replies; a pair is dropped whole when either side is.
"""

from meshtron.data import names
from meshtron.data.handlers import BadRecord
from meshtron.data.handlers.instruction import ALPACA_ALIASES, ChatHandler, alpaca_messages, sharegpt_messages


class PairwiseHandler(ChatHandler):
    name = "pairwise"
    kind = "pairwise"
    KEY_ALIASES = {**ALPACA_ALIASES, "messages": "conversations"}

    def outputs(self) -> dict[str, type]:
        single = super().outputs()
        return {names.side(name, side): dtype for side in names.SIDES for name, dtype in single.items()}

    def response(self, record: dict, side: str) -> str:
        value = record.get(self.key(side))
        if isinstance(value, dict):
            value = value.get(self.map_keys.get("content_tag", "value"))
        if not isinstance(value, str):
            raise BadRecord(f"missing field {self.key(side)!r} (a string, or a turn object)")
        if not value.strip():
            raise BadRecord(f"empty text in field {self.key(side)!r}")
        return value

    def prompt(self, record: dict) -> list[dict]:
        if self.key("conversations") in record:
            turns = self.get(record, "conversations", kind=list)
            return sharegpt_messages(self, turns, self.key("conversations"))
        return alpaca_messages(self, record)

    def encode(self, record: dict):
        prompt = self.prompt(record)
        out = {}
        for side in names.SIDES:
            messages = prompt + [{"role": "assistant", "content": self.response(record, side)}]
            encoded = self.chat.encode(messages)
            kept = self.truncate(encoded.ids, encoded.labels)
            if kept is None:
                return None
            out[names.side(names.INPUT_IDS, side)], out[names.side(names.LABELS, side)] = kept
        return out
