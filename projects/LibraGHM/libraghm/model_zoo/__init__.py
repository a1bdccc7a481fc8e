"""
LibraGHM's model zoo, mirroring :mod:`detectron2.model_zoo`: configs by name and the released
checkpoints of the built-in-dataset models. See MODEL_ZOO.md.
"""
from .model_zoo import get, get_checkpoint_url, get_config, get_config_file, model_zoo_root

__all__ = ["get", "get_checkpoint_url", "get_config", "get_config_file", "model_zoo_root"]
