"""Instruction handlers: `alpaca`, `sharegpt`, `openai`, rendered through a chat template.

Each turns a record into role/content messages; `ChatEncoder` renders them,
tokenizes the text exactly as `tokenizer.apply_chat_template` does, and keeps the
loss (labels = token ids) on the tokens of every assistant reply, -100 elsewhere.

Truncation policy for a sample longer than --seq-length: "right" (default) keeps
its first seq_length tokens; "drop" drops it. Both are counted. A sample left with
no assistant token after truncation is dropped and counted too.
"""

from dataclasses import dataclass

import numpy as np

from meshtron.data import names
from meshtron.data.handlers import IGNORE_INDEX, LABEL_DTYPE, BadRecord, Handler
from meshtron.data.indexed import token_dtype
from meshtron.data.templates import assistant_spans, resolve_template


@dataclass
class Encoded:
    """A rendered conversation: its text, token ids, labels, assistant spans and token offsets."""

    text: str
    ids: np.ndarray
    labels: np.ndarray
    spans: list[tuple[int, int]]
    offsets: list[tuple[int, int]]


class ChatEncoder:
    """Messages -> (input_ids, labels) with the loss on assistant replies only."""

    def __init__(self, tokenizer, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = resolve_template(tokenizer, chat_template)

    def encode(self, messages: list[dict]) -> Encoded:
        text, spans = assistant_spans(self.tokenizer, self.template, messages)
        if not spans:
            raise BadRecord("no assistant reply to learn from")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        starts = np.asarray([start for start, _ in enc["offset_mapping"]], dtype=np.int64)
        trained = np.zeros(len(ids), dtype=bool)
        for span_start, span_end in spans:
            trained |= (starts >= span_start) & (starts < span_end)
        labels = np.where(trained, ids, IGNORE_INDEX)
        return Encoded(text, ids, labels, spans, enc["offset_mapping"])


class ChatHandler(Handler):
    """Base of the SFT handlers: outputs, truncation, and the record -> messages hook."""

    kind = "sft"

    def __init__(self, tokenizer, options) -> None:
        super().__init__(tokenizer, options)
        self.chat = ChatEncoder(tokenizer, options.chat_template)

    def outputs(self) -> dict[str, type]:
        return {
            names.INPUT_IDS: token_dtype(len(self.tokenizer)),
            names.LABELS: LABEL_DTYPE,
        }

    def messages(self, record: dict) -> list[dict]:
        raise NotImplementedError

    def truncate(self, ids: np.ndarray, labels: np.ndarray):
        """Apply the truncation policy; None means the sample is dropped (and counted)."""
        limit = self.options.seq_length
        if limit is None or len(ids) <= limit:
            return ids, labels
        if self.options.truncation == "drop":
            self.stats["dropped (longer than --seq-length)"] += 1
            return None
        ids, labels = ids[:limit], labels[:limit]
        if not (labels != IGNORE_INDEX).any():
            self.stats["dropped (no assistant token left after truncation)"] += 1
            return None
        self.stats["truncated to --seq-length"] += 1
        return ids, labels

    def encode(self, record: dict):
        encoded = self.chat.encode(self.messages(record))
        kept = self.truncate(encoded.ids, encoded.labels)
        if kept is None:
            return None
        return {names.INPUT_IDS: kept[0], names.LABELS: kept[1]}


def alpaca_messages(handler: Handler, record: dict, response: str | None = None) -> list[dict]:
    """Alpaca fields -> messages: system, history pairs, instruction (+ input), output."""
    messages = []
    system = handler.get(record, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for turn in handler.get(record, "history", required=False, kind=list) or []:
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRecord(f"field {handler.key('history')!r} must be a list of [query, response] string pairs")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = handler.get(record, "instruction")
    query = handler.get(record, "input", required=False)
    if query:
        prompt = f"{prompt}\n{query}"
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


ALPACA_ALIASES = {"prompt": "instruction", "query": "input", "response": "output"}


class AlpacaHandler(ChatHandler):
    """{"instruction", "input"?, "output", "system"?, "history"?: [[query, response], ...]}."""

    name = "alpaca"
    KEY_ALIASES = ALPACA_ALIASES

    def messages(self, record: dict) -> list[dict]:
        return alpaca_messages(self, record, self.get(record, "output"))


# ShareGPT role names (renamable with --map-keys, e.g. {"user_tag": "user"}) -> chat roles.
SHAREGPT_ROLES = {
    "user_tag": ("human", "user"),
    "assistant_tag": ("gpt", "assistant"),
    "system_tag": ("system", "system"),
    "observation_tag": ("observation", "tool"),
    # A function call is the assistant's turn, so it is learned like any reply.
    "function_tag": ("function_call", "assistant"),
}


def sharegpt_messages(handler: Handler, turns: list, field: str) -> list[dict]:
    role_tag = handler.map_keys.get("role_tag", "from")
    content_tag = handler.map_keys.get("content_tag", "value")
    roles = {handler.map_keys.get(tag, name): role for tag, (name, role) in SHAREGPT_ROLES.items()}
    messages = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_tag not in turn or content_tag not in turn:
            raise BadRecord(f"{field}[{n}] must be an object with {role_tag!r} and {content_tag!r}")
        if turn[role_tag] not in roles:
            raise BadRecord(f"{field}[{n}] has unknown role {turn[role_tag]!r} (known: {', '.join(roles)})")
        if not isinstance(turn[content_tag], str) or not turn[content_tag].strip():
            raise BadRecord(f"empty text in {field}[{n}]")
        messages.append({"role": roles[turn[role_tag]], "content": turn[content_tag]})
    return messages


class ShareGPTHandler(ChatHandler):
    """{"conversations": [{"from": "human"|"gpt"|"system"|"observation"|"function_call", "value"}], "system"?}."""

    name = "sharegpt"
    KEY_ALIASES = {"messages": "conversations"}

    def messages(self, record: dict) -> list[dict]:
        turns = self.get(record, "conversations", kind=list)
        messages = sharegpt_messages(self, turns, self.key("conversations"))
        system = self.get(record, "system", required=False)
        if system and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": system})
        return messages


OPENAI_ROLES = ("system", "user", "assistant", "tool")


class OpenAIHandler(ChatHandler):
    """{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}]}."""

    name = "openai"

    def messages(self, record: dict) -> list[dict]:
        field = self.key("messages")
        messages = []
        for n, message in enumerate(self.get(record, "messages", kind=list)):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise BadRecord(f"{field}[{n}] must be an object with 'role' and 'content'")
            if message["role"] not in OPENAI_ROLES:
                raise BadRecord(f"{field}[{n}] has unknown role {message['role']!r} (known: {', '.join(OPENAI_ROLES)})")
            if not isinstance(message["content"], str) or not message["content"].strip():
                raise BadRecord(f"empty text in {field}[{n}]")
            messages.append({"role": message["role"], "content": message["content"]})
        return messages
