"""Incremental detokenization that never emits a partial multi-byte character, and stop strings.

Each new token is decoded together with a few tokens before it (the offsets scheme used by
serving engines), so a step costs O(1) in the length of the text, and tokenizers that drop a
leading space at the start of a decode still place spaces right.
"""

from collections.abc import Sequence


class IncrementalDecoder:
    """Turn a stream of token ids into text chunks.

    A byte-level BPE token can end in the middle of a UTF-8 character; the tokenizer then
    decodes it to U+FFFD, so such text is held back until a later token completes it. With
    stop strings, text that could be the start of one is held back too, and the text ends
    right before the first stop string found (`stopped` becomes True). A stop token id also
    stops the stream; it is not part of the text.
    """

    def __init__(self, tokenizer, stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""  # all complete text so far
        self.stopped = False
        self._prefix_offset = 0  # ids[prefix:read] is context for decoding ids[read:]
        self._read_offset = 0
        self._emitted = 0  # characters of `text` already returned

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (possibly empty)."""
        if self.stopped:
            return ""
        if token_id in self.stop_token_ids:
            self.stopped = True
            return self._release(final=True)
        self.ids.append(token_id)
        self._decode_new(allow_partial=False)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: return whatever is still held back."""
        if not self.stopped:
            self._decode_new(allow_partial=True)
        return self._release(final=True)

    def _decode_new(self, allow_partial: bool) -> None:
        context = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(context) and (allow_partial or not full.endswith("\ufffd")):
            self.text += full[len(context) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)

    def _release(self, final: bool) -> str:
        if self.stop_strings:
            # A stop string can straddle what was emitted and what is new, but never start in
            # emitted text: emitted text was never the start of a stop string.
            hits = [i for i in (self.text.find(s, self._emitted) for s in self.stop_strings) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = final = True
        end = len(self.text) if final else len(self.text) - self._stop_prefix_length()
        chunk = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return chunk

    def _stop_prefix_length(self) -> int:
        """Length of the longest suffix of `text` (not yet emitted) that begins a stop string."""
        longest = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(self.text) - self._emitted), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

