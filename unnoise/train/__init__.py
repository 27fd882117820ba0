"""Training: ``train(load_config("config.toml"))`` or ``unnoise train config.toml``; see ``unnoise.train.config``."""

from unnoise.train.config import TrainConfig, config_from_dict, load_config
from unnoise.train.loop import train

__all__ = ["TrainConfig", "config_from_dict", "load_config", "train"]
