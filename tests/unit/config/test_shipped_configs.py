"""Every shipped config loads and validates as is."""

from pathlib import Path

import pytest

from meshtron.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    config = load_config(path)
    assert config.train.output_dir.startswith("runs/")
