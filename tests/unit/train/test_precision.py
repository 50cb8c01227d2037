"""model.dtype = auto (the default): bfloat16 compute over float32 master weights on CUDA, float32
elsewhere; the shipped configs leave it to the device. train.compile = auto (the default): compiled
blocks on CUDA, eager elsewhere."""

from pathlib import Path

import pytest
import torch

from meshtron.config import JobConfig, load_config
from meshtron.errors import UserError
from meshtron.train.build import compile_blocks, precision

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").rglob("*.toml"))


def test_auto_is_bfloat16_on_cuda_and_float32_elsewhere():
    config = JobConfig()
    assert config.model.dtype == "auto"
    assert precision(config, "cuda") == (torch.bfloat16, torch.float32)
    assert precision(config, "cpu") == (torch.float32, torch.float32)


def test_an_explicit_dtype_is_kept_on_every_device():
    config = JobConfig()
    config.model.dtype = "float16"
    assert precision(config, "cpu") == precision(config, "cuda") == (torch.float16, torch.float32)


def test_auto_with_a_lower_master_dtype_is_refused_where_it_means_float32():
    config = JobConfig()
    config.model.master_dtype = "bfloat16"
    assert precision(config, "cuda") == (torch.bfloat16, torch.bfloat16)  # pure bfloat16
    with pytest.raises(UserError, match="model.dtype = float32 with model.master_dtype = bfloat16"):
        precision(config, "cpu")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_train_in_bfloat16_on_a_gpu(path):
    """No shipped config pins float32: on a GPU that would run at a tenth of its bfloat16 rate."""
    assert precision(load_config(path), "cuda")[0] == torch.bfloat16


def test_compile_is_on_for_cuda_and_off_elsewhere_unless_set(tmp_path):
    config = JobConfig()
    assert config.train.compile == "auto"
    assert compile_blocks(config, "cuda") and not compile_blocks(config, "cpu")
    (tmp_path / "off.toml").write_text("[data]\nmock = true\n[train]\ncompile = false\n")
    assert not compile_blocks(load_config(tmp_path / "off.toml"), "cuda")
    assert compile_blocks(load_config(tmp_path / "off.toml", ["--train.compile", "true"]), "cpu")
    assert load_config(tmp_path / "off.toml", ["--train.compile", "auto"]).train.compile == "auto"
    with pytest.raises(UserError, match='train.compile = \'yes\': use true, false or "auto"'):
        load_config(tmp_path / "off.toml", ["--train.compile", "yes"])
