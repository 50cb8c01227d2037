"""Static-shape decode (meshtron/infer/static.py): the same greedy tokens as the cached decode, batched
with left padding and stop strings, for plain, sliding-window and soft-capped attention; compiled, one
graph for every step and for a second call of the same shapes."""

import pytest
import torch

from meshtron.infer.generation import SamplingParams, generate, generate_text
from meshtron.models.registry import build_model, get_flavor


class LetterTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _model(flavor: str):
    m = build_model(get_flavor(flavor))
    m.to_empty(device="cpu")
    m.init_weights(seed=5)
    return m.eval()


PROMPTS = [[5, 6, 7], [9, 10], [3] * 12]


@pytest.mark.parametrize("flavor", ["llama:debug", "mistral:debug", "gemma2:debug", "deepseek_v3:debug"])
def test_static_decode_gives_the_cached_decodes_greedy_tokens(flavor):
    m = _model(flavor)
    params = SamplingParams(max_new_tokens=16)
    dynamic = generate(m, PROMPTS, params)
    assert generate(m, PROMPTS, params, decode="static") == dynamic
    # Stop strings end rows at different steps; the finished rows keep running as padding.
    text = LetterTokenizer().decode(dynamic[0])
    stopped = SamplingParams(max_new_tokens=16, stop_strings=(text[5:7],))
    want = generate_text(m, LetterTokenizer(), PROMPTS, stopped)
    assert want[0].finish_reason == "stop"
    assert generate_text(m, LetterTokenizer(), PROMPTS, stopped, decode="static") == want


def test_unknown_decode_mode_is_refused():
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(_model("llama:debug"), PROMPTS, SamplingParams(max_new_tokens=2), decode="fast")


@pytest.mark.slow  # compiling takes 10-30 s on a loaded CPU
def test_compiled_decode_compiles_once_and_gives_the_same_tokens():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    m = _model("llama:debug")
    params = SamplingParams(max_new_tokens=12)
    assert generate(m, PROMPTS, params, decode="compiled") == generate(m, PROMPTS, params)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 1
    # Other prompts of the same batch size and rounded length replay the same graph.
    others = [[1, 2], [4] * 7, [8, 9, 10, 11]]
    assert generate(m, others, params, decode="compiled") == generate(m, others, params)
    assert counters["stats"]["unique_graphs"] == compiled
