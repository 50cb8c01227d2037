"""Handlers with SmolLM2's real chat template: exact tokens, loss mask on assistant replies only."""

import copy

import numpy as np
import pytest

from meshtron.data.handlers import IGNORE_INDEX, BadRecord, HandlerOptions, make_handler
from meshtron.errors import UserError

pytestmark = pytest.mark.smollm2


def reference_ids(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]


def chatml_mask(tokenizer, ids):
    """Independent mask: tokens after each `<|im_start|>assistant\\n` up to and including `<|im_end|>`."""
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    mask = np.zeros(len(ids), dtype=bool)
    t = 0
    while t < len(ids):
        if ids[t : t + len(header)] == header:
            t += len(header)
            while t < len(ids):
                mask[t] = True
                if ids[t] == end:
                    break
                t += 1
        t += 1
    return mask


def check(tokenizer, result, messages, **kwargs):
    ids = result["packed_input_ids_document"].tolist()
    labels = result["packed_labels_document"]
    assert ids == reference_ids(tokenizer, messages, **kwargs)
    mask = chatml_mask(tokenizer, ids)
    assert mask.sum() > 0
    np.testing.assert_array_equal(labels, np.where(mask, ids, IGNORE_INDEX))


def encode(tokenizer, handler, record, **options):
    return make_handler(handler, tokenizer, HandlerOptions(**options)).encode(record)


def test_alpaca_with_system_input_and_history(smollm2_tokenizer):
    record = {"instruction": "Reverse the word.", "input": "apple", "output": "elppa", "system": "Be terse.",
              "history": [["Hi", "Hello! How can I help?"], ["What is 2+2?", "4"]]}
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Reverse the word.\napple"}, {"role": "assistant", "content": "elppa"},
    ]
    check(smollm2_tokenizer, encode(smollm2_tokenizer, "alpaca", record), messages)


def test_alpaca_default_system_prompt_is_not_trained(smollm2_tokenizer):
    record = {"instruction": "Add 2 and 3.", "output": "5"}
    messages = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    result = encode(smollm2_tokenizer, "alpaca", record)
    check(smollm2_tokenizer, result, messages)
    trained = result["packed_labels_document"][result["packed_labels_document"] != IGNORE_INDEX]
    assert smollm2_tokenizer.decode(trained) == "5<|im_end|>"


def test_sharegpt_multi_turn_and_tool_roles(smollm2_tokenizer):
    record = {"system": "You call tools.", "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 degrees."},
        {"from": "human", "value": "Thanks"},
        {"from": "gpt", "value": "You're welcome."},
    ]}
    messages = [
        {"role": "system", "content": "You call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    check(smollm2_tokenizer, encode(smollm2_tokenizer, "sharegpt", record), messages)


def test_openai_messages_every_assistant_turn(smollm2_tokenizer):
    messages = [{"role": "user", "content": f"Count to {n}."} if i % 2 == 0 else
                {"role": "assistant", "content": " ".join(str(k) for k in range(1, n + 1))}
                for i, n in enumerate([1, 1, 2, 2, 3, 3])]
    result = encode(smollm2_tokenizer, "openai", {"messages": messages})
    check(smollm2_tokenizer, result, messages)
    assert (result["packed_labels_document"] == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")).sum() == 3


def test_map_keys_rename_fields_and_roles(smollm2_tokenizer):
    record = {"dialog": [{"speaker": "me", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}]}
    mapping = {"conversations": "dialog", "role_tag": "speaker", "content_tag": "text",
               "user_tag": "me", "assistant_tag": "bot"}
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    check(smollm2_tokenizer, encode(smollm2_tokenizer, "sharegpt", record, map_keys=mapping), messages)
    alpaca = encode(smollm2_tokenizer, "alpaca", {"q": "Hi", "a": "Hello"},
                    map_keys={"instruction": "q", "output": "a"})
    check(smollm2_tokenizer, alpaca, messages)


def test_builtin_template_for_tokenizer_without_one(smollm2_tokenizer):
    from meshtron.data.templates import BUILTIN_TEMPLATES

    bare = copy.deepcopy(smollm2_tokenizer)
    bare.chat_template = None
    record = {"instruction": "Hi", "output": "Hello"}
    with pytest.raises(UserError, match="no chat template"):
        encode(bare, "alpaca", record)
    result = encode(bare, "alpaca", record, chat_template="chatml")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    check(bare, result, messages, chat_template=BUILTIN_TEMPLATES["chatml"])
    assert result["packed_input_ids_document"][0] == bare.convert_tokens_to_ids("<|im_start|>")  # no system prompt


def test_truncation_policy_is_applied_and_counted(smollm2_tokenizer):
    long = {"instruction": "Hi", "output": " ".join(["word"] * 200)}
    handler = make_handler("alpaca", smollm2_tokenizer, HandlerOptions(seq_length=64))
    result = handler.encode(long)
    assert len(result["packed_input_ids_document"]) == 64
    assert handler.stats["truncated to --seq-length"] == 1
    dropper = make_handler("alpaca", smollm2_tokenizer, HandlerOptions(seq_length=64, truncation="drop"))
    assert dropper.encode(long) is None
    assert dropper.stats["dropped (longer than --seq-length)"] == 1
    # Truncation that leaves no assistant token drops the sample.
    no_room = make_handler("alpaca", smollm2_tokenizer, HandlerOptions(seq_length=20))
    assert no_room.encode(long) is None
    assert no_room.stats["dropped (no assistant token left after truncation)"] == 1


@pytest.mark.parametrize("record,reason", [
    ({"output": "x"}, "missing field 'instruction'"),
    ({"instruction": "  ", "output": "x"}, "empty text in field 'instruction'"),
    ({"instruction": "x", "output": 3}, "must be str"),
    ({"instruction": "x", "output": "y", "history": [["only one"]]}, "history"),
])
def test_bad_alpaca_records(smollm2_tokenizer, record, reason):
    with pytest.raises(BadRecord, match=reason):
        encode(smollm2_tokenizer, "alpaca", record)


def test_pretrain_batch_matches_tokenizer(smollm2_tokenizer):
    handler = make_handler("pretrain", smollm2_tokenizer, HandlerOptions(append_eod=True))
    texts = ["Hello world.", "A second, longer document about tokenizers."]
    results = handler.encode_batch([{"text": t} for t in texts] + [{"text": ""}, {"body": "x"}])
    for text, result in zip(texts, results):
        assert result["text_document"].tolist() == smollm2_tokenizer(text)["input_ids"] + [2]
    assert "empty text" in str(results[2]) and "missing field 'text'" in str(results[3])


def test_pairwise_alpaca_and_sharegpt_shapes(smollm2_tokenizer):
    handler = make_handler("pairwise", smollm2_tokenizer, HandlerOptions())
    prompt = [{"role": "user", "content": "2+2?"}]
    for record in ({"instruction": "2+2?", "chosen": "4", "rejected": "5"},
                   {"conversations": [{"from": "human", "value": "2+2?"}],
                    "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}):
        result = handler.encode(record)
        for side, answer in (("chosen", "4"), ("rejected", "5")):
            messages = prompt + [{"role": "assistant", "content": answer}]
            check(smollm2_tokenizer, {"packed_input_ids_document": result[f"packed_{side}_input_ids_document"],
                                      "packed_labels_document": result[f"packed_{side}_labels_document"]}, messages)


def test_prm_labels_sit_on_step_separators(smollm2_tokenizer):
    handler = make_handler("prm", smollm2_tokenizer, HandlerOptions())
    record = {"question": "What is 3*4+1?", "steps": ["3*4 = 12.", "12+1 = 14.", "The answer is 14."],
              "labels": ["+", "-", 0]}
    result = handler.encode(record)
    ids, labels = result["packed_input_ids_document"], result["packed_labels_document"]
    solution = "3*4 = 12.\n\n12+1 = 14.\n\nThe answer is 14.\n\n"
    messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": solution}]
    assert ids.tolist() == reference_ids(smollm2_tokenizer, messages)
    positions = np.flatnonzero(labels != IGNORE_INDEX)
    assert labels[positions].tolist() == [1, 0, 0]
    # Each labelled token ends its step's separator: decoding up to it ends with the step and "\n\n".
    for position, step in zip(positions, record["steps"]):
        assert smollm2_tokenizer.decode(ids[: position + 1]).endswith(step + "\n\n")
    with pytest.raises(BadRecord, match="3 steps but 2 labels"):
        handler.encode({**record, "labels": ["+", "+"]})
    with pytest.raises(BadRecord, match="label 0"):
        handler.encode({**record, "labels": ["?", "+", "+"]})


def test_unknown_handler_and_template(smollm2_tokenizer):
    with pytest.raises(UserError, match="unknown handler 'nope'"):
        make_handler("nope", smollm2_tokenizer, HandlerOptions())
    with pytest.raises(UserError, match="neither a file nor a built-in"):
        make_handler("alpaca", smollm2_tokenizer, HandlerOptions(chat_template="mystery"))


@pytest.mark.parametrize("name,end_of_turn", [("chatml", "<|im_end|>"), ("qwen", "<|im_end|>"),
                                               ("llama3", "<|eot_id|>")])
def test_every_builtin_template_trains_reply_and_end_of_turn(smollm2_tokenizer, tmp_path, name, end_of_turn):
    from meshtron.data.templates import BUILTIN_TEMPLATES

    # The markers are single special tokens in their families' tokenizers; make them so here.
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    messages = [{"role": "system", "content": "S."}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
    result = encode(tokenizer, "openai", {"messages": messages}, chat_template=name)
    ids, labels = result["packed_input_ids_document"], result["packed_labels_document"]
    assert ids.tolist() == reference_ids(tokenizer, messages, chat_template=BUILTIN_TEMPLATES[name])
    # The trained runs of tokens are exactly the two replies, each with its end-of-turn marker.
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    runs = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)
    assert [tokenizer.decode(ids[run]) for run in runs] == [f"A1{end_of_turn}", f"A2{end_of_turn}"]
    # A template file works like a built-in name.
    path = tmp_path / "template.jinja"
    path.write_text(BUILTIN_TEMPLATES[name])
    from_file = encode(tokenizer, "openai", {"messages": messages}, chat_template=str(path))
    np.testing.assert_array_equal(from_file["packed_labels_document"], labels)


def test_mindspeed_style_map_keys(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    record = {"dialog": [{"speaker": "me", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}]}
    mapping = {"messages": "dialog", "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me",
                                              "assistant_tag": "bot"}}
    check(smollm2_tokenizer, encode(smollm2_tokenizer, "sharegpt", record, map_keys=mapping), messages)
    alpaca = encode(smollm2_tokenizer, "alpaca", {"q": "Hi", "a": "Hello"}, map_keys={"prompt": "q", "response": "a"})
    check(smollm2_tokenizer, alpaca, messages)
    with pytest.raises(UserError, match="must be a field name"):
        encode(smollm2_tokenizer, "alpaca", {}, map_keys={"prompt": 3})


def test_template_that_rejects_a_conversation_gives_a_bad_record(smollm2_tokenizer, tmp_path):
    path = tmp_path / "strict.jinja"
    path.write_text("{% for m in messages %}{% if loop.index0 % 2 == 0 and m['role'] != 'user' %}"
                    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                    "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    messages = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]
    with pytest.raises(BadRecord, match="chat template rejects this conversation: roles must alternate"):
        encode(smollm2_tokenizer, "openai", {"messages": messages}, chat_template=str(path))
