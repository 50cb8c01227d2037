"""A multi-turn conversation with a model: a bounded history rendered through the chat template."""

from collections.abc import Callable
from dataclasses import replace

from meshtron.errors import UserError
from meshtron.infer.generation import SamplingParams, generate_text
from meshtron.infer.loading import LoadedModel, encode_messages, pad_token_id


class ChatSession:
    """Keeps the last `max_turns` exchanges (fewer when the context fills up) and a system prompt.

    A reply that does not finish (an error, Ctrl-C) leaves the history as it was, so the
    conversation goes on from the last complete exchange.
    """

    def __init__(self, loaded: LoadedModel, params: SamplingParams, system: str | None = None, max_turns: int = 16,
                 decode: str = "dynamic"):
        if max_turns < 1:
            raise UserError(f"--max-turns must be >= 1, got {max_turns}")
        self.loaded = loaded
        self.params = replace(params, stop_token_ids=loaded.stop_token_ids)
        self.system = system
        self.max_turns = max_turns
        self.decode = decode  # as in `generate`
        self.history: list[dict] = []  # alternating user / assistant messages

    def clear(self) -> None:
        self.history = []

    def prompt_ids(self, user_text: str) -> list[int]:
        """The conversation so far plus `user_text`, dropping the oldest exchanges that do not fit."""
        context = self.loaded.model.args.max_seq_len
        turns = self.history[-2 * self.max_turns :]
        system = [{"role": "system", "content": self.system}] if self.system else []
        while True:
            ids = encode_messages(self.loaded.tokenizer, system + turns + [{"role": "user", "content": user_text}])
            if len(ids) + self.params.max_new_tokens <= context:
                return ids
            if not turns:
                raise UserError(f"this message ({len(ids)} tokens with the template) leaves no room for a "
                                f"{self.params.max_new_tokens}-token reply in the {context}-token context")
            turns = turns[2:]

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        ids = self.prompt_ids(user_text)
        (completion,) = generate_text(
            self.loaded.model, self.loaded.tokenizer, [ids], self.params,
            pad_id=pad_token_id(self.loaded.tokenizer), on_text=(lambda row, chunk: on_text(chunk)) if on_text else None,
            decode=self.decode,
        )
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": completion.text}]
        self.history = self.history[-2 * self.max_turns :]
        return completion.text
