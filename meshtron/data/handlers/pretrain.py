"""`pretrain`: plain text documents, one output dataset per --json-keys field."""

import numpy as np

from meshtron.data import names
from meshtron.data.handlers import BadRecord, Handler
from meshtron.data.indexed import token_dtype
from meshtron.errors import UserError


class PretrainHandler(Handler):
    name = "pretrain"
    kind = "pretrain"

    def __init__(self, tokenizer, options) -> None:
        super().__init__(tokenizer, options)
        if options.append_eod and tokenizer.eos_token_id is None:
            raise UserError("--append-eod needs a tokenizer with an eos token; this one has none")

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """The ids `tokenizer(text)["input_ids"]` gives, for many texts at once."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            # The same Rust call transformers makes, minus character offsets (~25% faster).
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
        return self.tokenizer(texts)["input_ids"]

    def outputs(self) -> dict[str, type]:
        dtype = token_dtype(len(self.tokenizer))
        return {names.text_dataset(key): dtype for key in self.options.json_keys}

    def encode_batch(self, records: list[dict]) -> list:
        # Validate every record first, then tokenize the good texts in one call per key
        # (the fast tokenizer's batch call costs far less per document than single calls).
        results: list = [{} for _ in records]
        for key in self.options.json_keys:
            good, texts = [], []
            for i, record in enumerate(records):
                if isinstance(results[i], BadRecord):
                    continue
                try:
                    texts.append(self.get(record, key))
                    good.append(i)
                except BadRecord as e:
                    results[i] = e
            ids = self.tokenize(texts) if texts else []
            for i, tokens in zip(good, ids):
                if self.options.append_eod:
                    tokens.append(self.tokenizer.eos_token_id)
                results[i][names.text_dataset(key)] = np.asarray(tokens, dtype=np.int64)
        return results
