"""IncrementalDecoder: whole characters only, stop strings held back and cut, stop token ids."""

from meshtron.infer.streaming import IncrementalDecoder


class ByteTokenizer:
    """Token i < 256 is byte i; larger ids are special tokens (skipped when decoding)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _stream(text: str, stop_strings=(), extra_ids=(), stop_token_ids=()):
    decoder = IncrementalDecoder(ByteTokenizer(), stop_token_ids, stop_strings)
    chunks = [decoder.push(t) for t in [*text.encode(), *extra_ids]]
    chunks.append(decoder.finish())
    return [c for c in chunks if c], decoder


def test_multi_byte_characters_are_never_split():
    text = "héllo 🙂 wörld — 日本"
    chunks, decoder = _stream(text)
    assert "".join(chunks) == text == decoder.text
    assert all("\ufffd" not in c for c in chunks)
    assert len(chunks) == len(text)  # one chunk per completed character


def test_stop_string_cuts_the_text_and_its_start_is_held_back():
    chunks, decoder = _stream("abc STOP def", stop_strings=("STOP",))
    assert "".join(chunks) == "abc " == decoder.text
    assert decoder.stopped
    # "S", "ST", "STO" were held back: nothing of the stop string was ever emitted.
    assert all("S" not in c for c in chunks)


def test_held_back_text_is_released_when_the_stop_string_does_not_complete():
    chunks, decoder = _stream("a STO b", stop_strings=("STOP",))
    assert "".join(chunks) == "a STO b" and not decoder.stopped


def test_stop_string_ending_in_a_multi_byte_character_and_the_earliest_of_several():
    chunks, decoder = _stream("xx é! yy end", stop_strings=("end", "é!"))
    assert decoder.text == "xx " and "".join(chunks) == "xx "


def test_stop_token_id_ends_the_stream_and_special_tokens_are_skipped():
    chunks, decoder = _stream("hi", extra_ids=[300, *b" there", 301, *b" more"], stop_token_ids=[301])
    assert "".join(chunks) == "hi there" and decoder.stopped
