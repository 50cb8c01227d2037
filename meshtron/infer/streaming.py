"""Incremental detokenization that never prints a partial multi-byte character."""

from typing import TextIO


class TextStreamer:
    """Decode the whole generated sequence each time and print only the new, complete suffix.

    A byte-level BPE token can end in the middle of a UTF-8 character; the tokenizer then
    decodes it to U+FFFD, so text ending in U+FFFD is held back until the next token completes it.
    """

    def __init__(self, tokenizer, stop_token_ids, out: TextIO):
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.out = out
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped or token_id in self.stop_token_ids:
            self.stopped = True
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        chunk = self._emit(text)
        self.out.write("\n")
        self.out.flush()
        return chunk

    def _emit(self, text: str) -> str:
        chunk = text[self.printed :]
        if chunk:
            self.out.write(chunk)
            self.out.flush()
            self.printed = len(text)
        return chunk
