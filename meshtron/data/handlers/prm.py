"""`prm`: step-labelled solutions for process reward models.

Record: {"question": str, "steps": [str, ...], "labels": ["+" | "-" | 1 | 0 | true | false, ...]}.
The question is the user turn; the assistant turn is the steps, each followed by
the step separator (--step-separator, default "\\n\\n"). The label of a step sits at
the last token of its separator: labels[t] is 1 (good step) or 0 (bad step) there
and -100 everywhere else. `PREFIX_prm.json` records the separator and its ids.
"""

import numpy as np

from meshtron.data import names
from meshtron.data.handlers import IGNORE_INDEX, BadRecord
from meshtron.data.handlers.instruction import ChatHandler
from meshtron.errors import UserError

POSITIVE = ("+", 1, True, "1")
NEGATIVE = ("-", 0, False, "0")


class PRMHandler(ChatHandler):
    name = "prm"

    def step_label(self, value, n: int) -> int:
        # bool is an int subclass: compare by type and value so True is not read as 1-the-int twice.
        if any(value == v and type(value) is type(v) for v in POSITIVE):
            return 1
        if any(value == v and type(value) is type(v) for v in NEGATIVE):
            return 0
        raise BadRecord(f"label {n} is {value!r}; use '+'/'-', 1/0 or true/false")

    def encode(self, record: dict):
        question = self.get(record, "question")
        steps = self.get(record, "steps", kind=list)
        raw_labels = self.get(record, "labels", kind=list)
        if not steps:
            raise BadRecord(f"field {self.key('steps')!r} is empty")
        if len(steps) != len(raw_labels):
            raise BadRecord(f"{len(steps)} steps but {len(raw_labels)} labels")
        if not all(isinstance(s, str) and s.strip() for s in steps):
            raise BadRecord(f"every entry of {self.key('steps')!r} must be non-empty text")
        step_labels = [self.step_label(v, n) for n, v in enumerate(raw_labels)]
        sep = self.options.step_separator
        solution = "".join(step + sep for step in steps)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
        encoded = self.chat.encode(messages)
        ids = encoded.ids
        # The reply starts where its span starts; the k-th separator ends at a fixed offset inside it.
        reply_start = encoded.spans[-1][0]
        if encoded.text[reply_start : reply_start + len(solution)] != solution:
            raise UserError(
                "the chat template changes the assistant text (e.g. trims it), so step labels cannot be placed; "
                "use --step-separator with visible text (e.g. ' ки') or another --chat-template"
            )
        ends = np.asarray([end for _, end in encoded.offsets])
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        cursor = reply_start
        for step, label in zip(steps, step_labels):
            cursor += len(step) + len(sep)
            # The token that holds the separator's last character carries the step's label.
            position = int(np.searchsorted(ends, cursor, side="left"))
            assert position < len(ids), "separator beyond the rendered text"
            labels[position] = label
        kept = self.truncate(ids, labels)
        if kept is None:
            return None
        return {names.INPUT_IDS: kept[0], names.LABELS: kept[1]}

    def metadata(self) -> dict:
        sep = self.options.step_separator
        return {
            "step_separator": sep,
            "step_separator_ids": self.tokenizer(sep, add_special_tokens=False)["input_ids"],
            "label_values": {"good_step": 1, "bad_step": 0, "no_label": IGNORE_INDEX},
        }
