"""Handlers turn one raw record (a dict) into the token sequences of one sample.

A handler names its outputs (the Megatron-style dataset suffixes of INTERFACES.md),
their dtypes, and encodes records in batches. A record it cannot use raises
`BadRecord` with the reason; the reader adds the file and line. A record dropped
by the truncation policy returns None and is counted in `handler.stats`.
"""

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from meshtron.errors import UserError

# Labels carry -100 (no loss), so they need a signed dtype whatever the vocabulary size.
LABEL_DTYPE = np.int32
IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("right", "drop")


class BadRecord(Exception):
    """A record that cannot be turned into a sample; the message says why."""


@dataclass
class HandlerOptions:
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    map_keys: dict = field(default_factory=dict)
    chat_template: str | None = None
    seq_length: int | None = None
    truncation: str = "right"
    step_separator: str = "\n\n"


class Handler:
    """Base class: field lookup through --map-keys and the batch loop."""

    name = ""
    kind = ""  # "pretrain" | "sft" | "pairwise": which dataset family the outputs form
    # MindSpeed-LLM's names for this handler's canonical fields, accepted in --map-keys.
    KEY_ALIASES: dict[str, str] = {}

    def __init__(self, tokenizer, options: HandlerOptions) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self.stats = Counter()
        self.map_keys = self.normalize_map_keys(options.map_keys)

    def normalize_map_keys(self, map_keys: dict) -> dict:
        """Flatten MindSpeed-LLM's nested {"tags": {...}} and translate its field names to ours."""
        flat = {k: v for k, v in map_keys.items() if k != "tags"}
        tags = map_keys.get("tags", {})
        if not isinstance(tags, dict):
            raise UserError('--map-keys: "tags" must be an object, e.g. {"tags": {"role_tag": "from"}}')
        flat.update(tags)
        bad = [k for k, v in flat.items() if not isinstance(v, str)]
        if bad:
            raise UserError(f"--map-keys: the value of {bad[0]!r} must be a field name (a string)")
        return {self.KEY_ALIASES.get(k, k): v for k, v in flat.items()}

    def key(self, canonical: str) -> str:
        """The record's field name for a canonical one (renamed by --map-keys)."""
        return self.map_keys.get(canonical, canonical)

    def get(self, record: dict, canonical: str, required: bool = True, kind=str):
        name = self.key(canonical)
        value = record.get(name)
        if value is None:
            if required:
                raise BadRecord(f"missing field {name!r}")
            return None
        if not isinstance(value, kind):
            raise BadRecord(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
        if kind is str and required and not value.strip():
            raise BadRecord(f"empty text in field {name!r}")
        return value

    def outputs(self) -> dict[str, type]:
        """Dataset suffix (e.g. "packed_input_ids_document") -> dtype."""
        raise NotImplementedError

    def encode(self, record: dict) -> dict[str, np.ndarray] | None:
        raise NotImplementedError

    def metadata(self) -> dict | None:
        """What training needs to know beyond the token files (written as PREFIX_<handler>.json), if anything."""
        return None

    def encode_batch(self, records: list[dict]) -> list:
        """One result per record: a dict of arrays, None (dropped by policy) or a BadRecord."""
        results = []
        for record in records:
            try:
                results.append(self.encode(record))
            except BadRecord as e:
                results.append(e)
        return results


HANDLER_NAMES = ("pretrain", "alpaca", "sharegpt", "openai", "pairwise", "prm")


def make_handler(name: str, tokenizer, options: HandlerOptions) -> Handler:
    from meshtron.data.handlers.instruction import AlpacaHandler, OpenAIHandler, ShareGPTHandler
    from meshtron.data.handlers.pairwise import PairwiseHandler
    from meshtron.data.handlers.pretrain import PretrainHandler
    from meshtron.data.handlers.prm import PRMHandler

    classes = {
        "pretrain": PretrainHandler,
        "alpaca": AlpacaHandler,
        "sharegpt": ShareGPTHandler,
        "openai": OpenAIHandler,
        "pairwise": PairwiseHandler,
        "prm": PRMHandler,
    }
    assert set(classes) == set(HANDLER_NAMES)
    if name not in classes:
        raise UserError(f"unknown handler {name!r}; choose one of {', '.join(HANDLER_NAMES)}")
    if options.truncation not in TRUNCATION_POLICIES:
        raise UserError(f"unknown truncation policy {options.truncation!r}; choose one of {TRUNCATION_POLICIES}")
    return classes[name](tokenizer, options)
