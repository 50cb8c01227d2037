"""KV-cache decoding equals a full forward; left padding is invisible."""

import torch

from meshtron.models.registry import build_model, get_flavor


def _model(family="qwen2"):
    args = get_flavor(f"{family}:debug")
    m = build_model(args)
    m.to_empty(device="cpu")
    m.init_weights(seed=3)
    return m.eval(), args


def test_incremental_decoding_matches_full_forward():
    for family in ("llama", "mistral", "qwen3"):  # mistral's window (8) is crossed by 14 tokens
        m, args = _model(family)
        tokens = torch.randint(0, args.vocab_size, (2, 14))
        with torch.no_grad():
            full = m(tokens)
            cache = m.new_cache(2, 14)
            parts = [m(tokens[:, :5], cache=cache)]
            for t in range(5, 14):
                parts.append(m(tokens[:, t : t + 1], cache=cache))
        assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5, family


def test_left_padded_row_matches_unpadded_run():
    m, args = _model("mistral")
    tokens = torch.randint(1, args.vocab_size, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    valid = torch.tensor([[False] * 3 + [True] * 10])
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = m(tokens)
        cache = m.new_cache(1, 13)
        cache.key_valid[:, :13] = valid
        got = m(padded, position_ids=positions, cache=cache)
    assert (got[:, 3:] - expected).abs().max().item() < 1e-5
