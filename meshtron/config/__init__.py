"""Training configuration: typed TOML sections (`job.py`) and their loading and checking (`loader.py`)."""

from meshtron.config.job import (
    CheckpointConfig,
    DataConfig,
    JobConfig,
    LogConfig,
    LRConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RecomputeConfig,
    RLConfig,
    TrainConfig,
)
from meshtron.config.loader import load_config, to_dict, to_toml

__all__ = [
    "CheckpointConfig", "DataConfig", "JobConfig", "LogConfig", "LRConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "RecomputeConfig", "RLConfig", "TrainConfig", "load_config", "to_dict", "to_toml",
]
