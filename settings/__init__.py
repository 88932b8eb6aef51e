"""Configuration: every section of a config file typed (`sections`), read strictly (`loading`); train.py's
command-line arguments on top of a config (`settings.training`, which imports transformers)."""

from .loading import Config, ConfigError, build, check_keys, load_config, read_yaml, resolve_path
from .sections import DataConfig, DataSource, DemoConfig, LoraConfig, ModelConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "DemoConfig",
    "LoraConfig",
    "ModelConfig",
    "build",
    "check_keys",
    "load_config",
    "read_yaml",
    "resolve_path",
]
