"""Turn a training output into a model-zoo release: a weights-only checkpoint with a short hash."""
import hashlib
import json
import os
import shutil
from typing import Dict, Optional

import torch
from detectron2.config import CfgNode, get_cfg

from ..config import add_libraghm_config

__all__ = ["release_checkpoint", "file_hash"]


def file_hash(path: str, length: int = 8) -> str:
    """
    Args:
        path (str): a file.
        length (int): number of hex digits kept.

    Returns:
        str: the first ``length`` hex digits of the file's SHA-256 (torch.hub's convention).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def release_checkpoint(
    checkpoint: str, config_file: str, dest_dir: str, metrics: Optional[Dict] = None
) -> str:
    """
    Write ``dest_dir/model_final_<hash>.pth`` holding only ``{"model": state_dict}`` of a
    Detectron2 training checkpoint (no optimizer, scheduler or iteration, so that loading it with
    :class:`DetectionCheckpointer` starts a new training or an evaluation), ``config.yaml`` beside
    it (the training config with ``MODEL.WEIGHTS`` and ``OUTPUT_DIR`` reset), and ``metrics.json``.

    Args:
        checkpoint (str): a ``.pth`` written by Detectron2's Checkpointer (e.g. model_final.pth).
        config_file (str): the training's full config (OUTPUT_DIR/config.yaml).
        dest_dir (str): release directory (created).
        metrics (dict or None): evaluation results to write beside it.

    Returns:
        str: path of the released checkpoint.

    Raises:
        KeyError: the config has a key that LibraGHM's defaults lack (e.g. one renamed since the
            training ran; the message names the new key). Nothing is written then.
    """
    state = torch.load(checkpoint, map_location="cpu")
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{checkpoint} is not a Detectron2 checkpoint (no 'model' entry).")
    with open(config_file) as f:
        cfg = CfgNode.load_cfg(f)
    # The release must load into the current code: a config with LibraGHM 0.1's keys (e.g.
    # LIBRAGHM.GHMC) fails here, naming the new key, instead of when the release is evaluated.
    add_libraghm_config(get_cfg()).merge_from_other_cfg(cfg)
    os.makedirs(dest_dir, exist_ok=True)
    for old in os.listdir(dest_dir):  # one release per directory
        if old.startswith("model_final_") and old.endswith(".pth"):
            os.remove(os.path.join(dest_dir, old))
    tmp = os.path.join(dest_dir, "model_final.pth.tmp")
    torch.save({"model": state["model"], "__author__": "LibraGHM"}, tmp)
    out = os.path.join(dest_dir, f"model_final_{file_hash(tmp)}.pth")
    shutil.move(tmp, out)

    cfg.MODEL.WEIGHTS = ""
    cfg.OUTPUT_DIR = "./output"
    with open(os.path.join(dest_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    if metrics is not None:
        with open(os.path.join(dest_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1, sort_keys=True)
    return out
