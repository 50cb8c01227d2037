"""The file names of preprocessed data, for every data kind, in one place.

`meshtron preprocess --output-prefix PREFIX` writes indexed datasets PREFIX_<name>.bin/.idx named
as Megatron-LM and MindSpeed-LLM name them; training finds, checks and opens them by data kind:

    pretrain  PREFIX_text_document (one dataset per --json-keys KEY: PREFIX_KEY_document)
    sft       PREFIX_packed_input_ids_document, PREFIX_packed_labels_document,
              PREFIX_packed_attention_mask_document
    pairwise  PREFIX_packed_{chosen,rejected}_{input_ids,labels}_document
"""

from pathlib import Path

KINDS = ("pretrain", "sft", "pairwise")
SIDES = ("chosen", "rejected")

TEXT = "text_document"
INPUT_IDS = "packed_input_ids_document"
LABELS = "packed_labels_document"
ATTENTION_MASK = "packed_attention_mask_document"


def text_dataset(json_key: str) -> str:
    """The pretrain dataset written for one --json-keys field."""
    return f"{json_key}_document"


def side(name: str, which: str) -> str:
    """An SFT dataset name for one side of a pair: packed_input_ids_document -> packed_chosen_input_ids_document."""
    return name.replace("packed_", f"packed_{which}_", 1)


def datasets(kind: str) -> tuple[str, ...]:
    """The datasets a complete prefix of `kind` holds (training reads all of them but the attention mask)."""
    if kind == "pretrain":
        return (TEXT,)
    if kind == "sft":
        return (INPUT_IDS, LABELS, ATTENTION_MASK)
    return tuple(side(name, which) for which in SIDES for name in (INPUT_IDS, LABELS))


def base_prefix(path: str, kind: str) -> str:
    """The --output-prefix of `path`, which may also name one of its datasets (PREFIX_text_document)."""
    for name in datasets(kind):
        if path.endswith(f"_{name}"):
            return path[: -len(name) - 1]
    return path


def is_complete(prefix: str, kind: str) -> bool:
    """Whether every dataset of `kind` under `prefix` is there (preprocess renames them into place last)."""
    if kind == "pretrain" and all(Path(f"{prefix}{ext}").is_file() for ext in (".bin", ".idx")):
        return True  # a dataset path itself (PREFIX_text_document, or another --json-keys field's)
    prefix = base_prefix(prefix, kind)
    return all(Path(f"{prefix}_{name}{ext}").is_file() for name in datasets(kind) for ext in (".bin", ".idx"))


def kinds_at(path: str) -> list[str]:
    """The data kinds of which `path` (a prefix, or a prefix with a dataset name) holds a complete set,
    the most specific first (any single dataset path also reads as pretraining tokens)."""
    return [kind for kind in reversed(KINDS) if is_complete(path, kind)]
