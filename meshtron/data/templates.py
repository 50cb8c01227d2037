"""Chat templates: the tokenizer's own by default, or a named built-in, or a Jinja file.

Rendering always goes through `tokenizer.apply_chat_template`, so a sample's tokens
are exactly what transformers produces for the same messages and template.

`assistant_spans` finds, in the rendered text, the characters of every assistant
reply (its content and the end-of-turn marker the template closes it with). It
renders each conversation prefix and requires the template to be prefix-stable
(rendering the first k messages yields a prefix of rendering all of them), which
holds for ChatML, Llama 3, Qwen 2.5 and most others; a template that rewrites
earlier turns (e.g. one that strips reasoning from past replies) is rejected
with a clear error rather than given a wrong loss mask.
"""

import os

import jinja2

from meshtron.data.handlers import BadRecord
from meshtron.errors import UserError

# Built-ins for tokenizers that ship no template. Written for this project; each
# follows the published turn format of its family.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    ),
    "qwen": (
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
    ),
}


def resolve_template(tokenizer, name_or_file: str | None) -> str:
    """The Jinja source to render with: a file, a built-in name, or the tokenizer's own."""
    if name_or_file is None:
        if not tokenizer.chat_template:
            raise UserError(
                "the tokenizer has no chat template; pass --chat-template with one of "
                f"{', '.join(sorted(BUILTIN_TEMPLATES))} or a Jinja file"
            )
        return tokenizer.chat_template
    if os.path.isfile(name_or_file):
        with open(name_or_file, encoding="utf-8") as f:
            return f.read()
    if name_or_file in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_file]
    raise UserError(
        f"--chat-template {name_or_file!r} is neither a file nor a built-in template "
        f"({', '.join(sorted(BUILTIN_TEMPLATES))})"
    )


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as e:
        # Templates reject conversations they cannot render (e.g. roles that do not alternate): a bad record.
        raise BadRecord(f"the chat template rejects this conversation: {e}") from None


def assistant_spans(tokenizer, template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant reply.

    A span runs from the end of the generation prompt to the end of the turn, less
    trailing whitespace: the model learns to write the reply and its end-of-turn
    token, not the newline a template puts between turns.
    """
    text = render(tokenizer, template, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        turn = render(tokenizer, template, messages[: i + 1])
        if not (text.startswith(turn) and turn.startswith(prompt)):
            raise UserError(
                "the chat template is not prefix-stable (rendering a conversation's first turns is not a prefix "
                "of rendering all of it), so assistant replies cannot be located; use another --chat-template"
            )
        end = len(turn.rstrip())
        if end > len(prompt):
            spans.append((len(prompt), end))
    return text, spans
