"""RL prompt data: `prompt` or `messages` through the chat template, the other fields kept for the
rewards, bad lines reported (or skipped and counted) like the preprocess handlers', and the loader's
per-rank shares and resume state."""

import json
from pathlib import Path

import pytest

from meshtron.config.job import DataConfig
from meshtron.data.prompts import PromptLoader, read_prompts
from meshtron.errors import UserError
from meshtron.infer.loading import encode_messages


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_prompt_and_messages(tmp_path, smollm2_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"},
                                              {"messages": messages, "answer": "hello", "level": 3}])
    first, second = read_prompts([str(path)], smollm2_tokenizer, DataConfig())
    assert first.prompt == "What is 2 + 2?" and first.fields == {"answer": "4"}
    assert first.token_ids == encode_messages(smollm2_tokenizer, [{"role": "user", "content": "What is 2 + 2?"}])
    assert second.prompt == messages and second.fields == {"answer": "hello", "level": 3}
    assert second.token_ids == encode_messages(smollm2_tokenizer, messages)


def test_bad_lines_name_file_and_line(tmp_path, smollm2_tokenizer):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "ok", "answer": "1"}, "{not json", {"answer": "2"},
                                              {"messages": [{"role": "user"}]}, {"prompt": "fine"}])
    with pytest.raises(UserError, match=rf"{path}:2: malformed JSON.*skip-bad-lines"):
        read_prompts([str(path)], smollm2_tokenizer, DataConfig())
    kept = read_prompts([str(path)], smollm2_tokenizer, DataConfig(skip_bad_lines=True))
    assert [p.prompt for p in kept] == ["ok", "fine"]
    write_lines(path, [{"answer": "2"}])
    with pytest.raises(UserError, match=rf"{path}:1: needs 'prompt'"):
        read_prompts([str(path)], smollm2_tokenizer, DataConfig())


def test_loader_shares_steps_and_resumes():
    prompts = list(range(10))  # the loader only moves them
    ranks = [PromptLoader(prompts, per_step=4, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    steps = [[next(it) for _ in range(3)] for it in map(iter, ranks)]
    positions = sorted(pos for rank in steps for step in rank for pos, _ in step)
    assert positions == list(range(12))  # each position once, over both ranks
    first_pass = [p for rank in steps for step in rank for pos, p in step if pos < 10]
    assert sorted(first_pass) == prompts  # a pass is a permutation of the set
    resumed = PromptLoader(prompts, per_step=4, dp_rank=1, dp_size=2, seed=3)
    resumed.load_state_dict(ranks[1].state_dict())
    assert next(iter(resumed)) == next(iter(ranks[1]))
    with pytest.raises(UserError, match="multiple of the data-parallel size"):
        PromptLoader(prompts, per_step=3, dp_rank=0, dp_size=2, seed=0)


def test_shipped_arithmetic_prompts_read_cleanly(smollm2_tokenizer):
    data = Path(__file__).resolve().parents[3] / "data"
    train = read_prompts([str(data / "arithmetic_prompts.jsonl")], smollm2_tokenizer, DataConfig())
    heldout = read_prompts([str(data / "arithmetic_heldout.jsonl")], smollm2_tokenizer, DataConfig())
    assert (len(train), len(heldout)) == (200, 60)
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert all(int(p.fields["answer"]) == eval(p.prompt.split("is ")[1].split("?")[0]) for p in train + heldout)
