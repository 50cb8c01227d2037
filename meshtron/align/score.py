"""Score responses with a trained reward model (`meshtron score`).

Each JSONL record is a conversation: {"prompt", "response"}, alpaca-shaped {"instruction",
"input"?, "output"}, or {"messages": [{"role", "content"}, ...]} ending with the assistant reply.
It is rendered through the model's chat template, as the rm recipe's pairwise data was, and the
score head's value at the last token is the reward.
"""

import json
from pathlib import Path

import torch

from meshtron.errors import UserError
from meshtron.models.common.masks import AttentionMask


def conversation(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise UserError(f"{where}: 'messages' must be a list ending with an assistant message")
        return messages
    if "prompt" in record and "response" in record:
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    if "instruction" in record and "output" in record:
        prompt = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise UserError(f"{where}: needs 'messages', 'prompt'+'response' or 'instruction'+'output'")


@torch.no_grad()
def score_file(model, tokenizer, input_path: Path, output, batch_size: int = 8) -> int:
    """Write each record with an added "reward" to `output` (a text stream); returns the count."""
    if not getattr(model.args, "num_labels", 0):
        raise UserError("this model has no score head; give a reward model (a run of the rm recipe)")
    if not input_path.is_file():
        raise UserError(f"{input_path} does not exist")
    records, encoded = [], []
    with open(input_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{input_path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            ids = tokenizer.apply_chat_template(conversation(record, where), tokenize=True, return_dict=True)
            records.append(record)
            encoded.append(list(ids["input_ids"]))
    for record, reward in zip(records, score_token_ids(model, encoded, batch_size)):
        output.write(json.dumps({**record, "reward": reward}, ensure_ascii=False) + "\n")
    return len(records)


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The reward of each conversation (ending with the assistant reply), rendered through the chat template."""
    encoded = [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"])
               for c in conversations]
    return score_token_ids(model, encoded, batch_size)


@torch.no_grad()
def score_token_ids(model, encoded: list[list[int]], batch_size: int = 8) -> list[float]:
    """The score head's value at the last token of each token sequence."""
    device = next(model.parameters()).device
    rewards = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        tokens = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        for row, ids in enumerate(chunk):
            tokens[row, : len(ids)] = torch.tensor(ids, device=device)
        # Each row one causal sequence; right padding: earlier positions are unaffected.
        mask = AttentionMask.for_batch(width, backend=model.attention)
        values = model(tokens, mask=mask)[..., 0].float()
        rewards += [values[row, len(ids) - 1].item() for row, ids in enumerate(chunk)]
    return rewards
