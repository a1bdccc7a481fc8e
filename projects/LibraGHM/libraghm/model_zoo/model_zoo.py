"""
``get_config_file`` / ``get_config`` / ``get`` over LibraGHM's own configs, as in
:mod:`detectron2.model_zoo`, and the ``libraghm://`` prefix under which released checkpoints are
read (by ``MODEL.WEIGHTS`` and :class:`DetectionCheckpointer` alike).

Released checkpoints live under :func:`model_zoo_root`: the ``LIBRAGHM_MODEL_ZOO`` environment
variable (a directory, or an http(s) URL prefix where the release files are hosted) or, by default,
the repository's ``model_zoo/`` directory, where ``tools/build_model_zoo.py`` writes them.
"""
import json
import os
from typing import Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathHandler, PathManager

from ..config import add_libraghm_config, check_config
from ..modeling.efficientdet_presets import apply_efficientdet_preset

__all__ = ["get", "get_checkpoint_url", "get_config", "get_config_file", "model_zoo_root"]

PREFIX = "libraghm://"
_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
# name -> release file (relative to the model-zoo root); written by tools/build_model_zoo.py.
CHECKPOINTS_JSON = os.path.join(os.path.dirname(__file__), "checkpoints.json")


def model_zoo_root() -> str:
    """
    Returns:
        str: where released checkpoints are looked up: ``$LIBRAGHM_MODEL_ZOO`` if set, else the
        repository's ``model_zoo/`` directory.
    """
    return os.environ.get("LIBRAGHM_MODEL_ZOO") or os.path.join(_REPO, "model_zoo")


def _configs_root() -> str:
    return os.environ.get("LIBRAGHM_CONFIGS") or os.path.join(_REPO, "configs")


def _canonical(config_path: str) -> str:
    name = config_path.replace("\\", "/")
    return name if name.endswith(".yaml") else name + ".yaml"


def get_config_file(config_path: str) -> str:
    """
    Args:
        config_path (str): a config relative to LibraGHM's ``configs/``, e.g.
            "Shapes-Detection/libra_faster_rcnn.yaml" (".yaml" may be left out).

    Returns:
        str: the absolute path of the config file.
    """
    path = os.path.join(_configs_root(), _canonical(config_path))
    if not os.path.isfile(path):
        raise RuntimeError(
            f"{config_path!r} is not a LibraGHM config: {path} does not exist. Valid names are the "
            f"yaml files under {_configs_root()} (e.g. 'Shapes-Detection/libra_faster_rcnn.yaml')."
        )
    return path


def get_checkpoint_url(config_path: str) -> str:
    """
    Args:
        config_path (str): as in :func:`get_config_file`.

    Returns:
        str: ``libraghm://<name>/model_final_<hash>.pth``, the released checkpoint of the config.
    """
    released = {}
    if os.path.isfile(CHECKPOINTS_JSON):
        with open(CHECKPOINTS_JSON) as f:
            released = json.load(f)
    name = _canonical(config_path)
    if name not in released:
        raise RuntimeError(
            f"{config_path!r} has no released checkpoint; released: {sorted(released)}."
        )
    return PREFIX + released[name]


def get_config(config_path: str, trained: bool = False) -> CfgNode:
    """
    Args:
        config_path (str): as in :func:`get_config_file`.
        trained (bool): set ``MODEL.WEIGHTS`` to the released checkpoint (else the config's own
            initial weights are kept).

    Returns:
        CfgNode: Detectron2's defaults + LibraGHM's keys + the config file, with its
        ``MODEL.EFFICIENTDET.PRESET`` applied (:func:`libraghm.modeling.apply_efficientdet_preset`;
        set the keys a preset governs after this call only if they are listed in
        ``MODEL.EFFICIENTDET.OVERRIDES``). A key of LibraGHM
        0.1 fails the merge, naming the new key; a LibraGHM setting on a Detectron2 part that
        would ignore it (or fail on it) fails :func:`libraghm.config.check_config`.
    """
    cfg = add_libraghm_config(get_cfg())
    cfg.merge_from_file(get_config_file(config_path))
    apply_efficientdet_preset(cfg)
    check_config(cfg)
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint_url(config_path)
    return cfg


def get(config_path: str, trained: bool = False, device: Optional[str] = None):
    """
    Build a model from a LibraGHM config, optionally with its released weights.

    Args:
        config_path (str): as in :func:`get_config_file`.
        trained (bool): load the released checkpoint; otherwise the weights stay randomly
            initialised (the config's ``MODEL.WEIGHTS`` is not loaded).
        device (str or None): e.g. "cpu" or "cuda"; None: "cuda" if available else "cpu".

    Returns:
        nn.Module: the model, in eval mode.
    """
    cfg = get_config(config_path, trained)
    cfg.MODEL.DEVICE = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg)
    if trained:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


class LibraGHMHandler(PathHandler):
    """
    Resolves ``libraghm://<file>`` to ``<model_zoo_root()>/<file>`` (downloaded and cached by
    Detectron2's PathManager when the root is a URL).
    """

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path, **kwargs):
        rel = path[len(PREFIX):]
        root = model_zoo_root()
        if root.startswith(("http://", "https://")):
            return PathManager.get_local_path(root.rstrip("/") + "/" + rel, **kwargs)
        local = os.path.join(root, rel)
        if not os.path.isfile(local):
            raise FileNotFoundError(
                f"{path}: {local} does not exist. Build it with `python tools/build_model_zoo.py "
                f"--only {os.path.dirname(rel)}`, or point LIBRAGHM_MODEL_ZOO at a directory or "
                "URL holding the release files."
            )
        return local

    def _open(self, path, mode="r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


PathManager.register_handler(LibraGHMHandler())
