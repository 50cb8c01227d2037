"""Load a model and its tokenizer for inference from an HF directory or a meshtron checkpoint."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from meshtron.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# End-of-turn markers of common chat templates; generation stops at any that the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU and bfloat16 on GPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    tokenizer_dir: Path
    stop_token_ids: list[int]


def load_for_generation(
    path: str, dtype: str = "auto", device: torch.device | None = None, tp_mesh=None
) -> LoadedModel:
    """Model (eval mode), tokenizer and stop ids from an HF directory or a meshtron checkpoint.

    With `tp_mesh` the model is sharded for tensor-parallel inference: built on the meta device,
    sharded, then each rank loads only its shards (from an HF directory or a checkpoint).
    """
    from transformers import AutoTokenizer

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    root = Path(path)
    if not root.exists():
        raise UserError(f"model path {root} does not exist")
    if (root / "config.json").is_file():
        model = _load_hf(root, device, torch_dtype, tp_mesh)
        tokenizer_dir = root
    else:
        from meshtron.checkpoint import load_for_inference
        from meshtron.checkpoint.manager import MANIFEST

        if not ((root / MANIFEST).is_file() or (root / "checkpoints").is_dir() or any(root.glob("step-*"))):
            raise UserError(f"{root} is neither a Hugging Face model directory (no config.json) nor a meshtron "
                            "checkpoint (no checkpoints/step-N); give an HF model directory or a run directory")
        model, _, tokenizer_dir = load_for_inference(root, device=device, dtype=torch_dtype, tp_mesh=tp_mesh)
        if tokenizer_dir is None:
            raise UserError(f"checkpoint {root} carries no tokenizer; generation needs one (train with a "
                            "tokenizer in the manifest, or convert the checkpoint and add tokenizer files)")
        tokenizer_dir = Path(tokenizer_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return LoadedModel(model, tokenizer, tokenizer_dir, stop_token_ids(tokenizer, tokenizer_dir))


def _load_hf(root: Path, device: torch.device, dtype: torch.dtype, tp_mesh) -> nn.Module:
    from meshtron.checkpoint.hf import load_hf_model, load_hf_weights, read_hf_config
    from meshtron.models.registry import build_model

    if tp_mesh is None:
        model, _ = load_hf_model(root, device=device, dtype=dtype)
        return model
    from meshtron.infer.tp import parallelize_for_inference

    spec, _, args = read_hf_config(root)
    model = build_model(args, device="meta")
    parallelize_for_inference(model, tp_mesh)
    model.to_empty(device=device)
    model.to(dtype)
    model.init_weights(skip=load_hf_weights(model, root, spec))
    return model


def stop_token_ids(tokenizer, model_dir: Path) -> list[int]:
    """EOS ids from the generation config and tokenizer, plus the chat template's end-of-turn tokens."""
    ids: set[int] = set()
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None) or ""
    for token in END_OF_TURN_TOKENS:
        if token in vocab and token in template:
            ids.add(vocab[token])
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    """Padding never reaches attention (masked), so any id serves when the tokenizer has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    if not chat:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return encode_messages(tokenizer, messages)


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the chat template, ending with the assistant's turn."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat needs a tokenizer with a chat template; this one has none")
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except TemplateError as e:  # e.g. a template that allows no system message
        raise UserError(f"the model's chat template rejected the conversation: {e}") from None
    return list(encoded["input_ids"])
