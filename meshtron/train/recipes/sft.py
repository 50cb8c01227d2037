"""Supervised fine-tuning: next-token loss on response tokens only.

The labels already carry -100 on prompts and padding (meshtron preprocess writes them), so the
loss is the pretraining one over fewer tokens; packed samples keep attention within a sample
through document_ids. What differs is the data kind and the default preprocess handler.
"""

from meshtron.train.recipes.pretrain import PretrainRecipe


class SFTRecipe(PretrainRecipe):
    name = "sft"
    data_kind = "sft"
    default_handler = "alpaca"
