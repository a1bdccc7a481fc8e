"""Every config in configs/ loads and builds; every config (built-in dataset and COCO) trains a step with finite losses."""
import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, get_config, tiny_batch

ALL = sorted(
    os.path.relpath(p, CONFIGS)
    for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)
SHAPES = [p for p in ALL if p.startswith("Shapes-Detection")]
COCO = [p for p in ALL if p.startswith("COCO-Detection")]


def test_config_tree_is_complete():
    assert "Shapes-Detection/faster_rcnn_small_R_FPN.yaml" in SHAPES
    assert "Shapes-Detection/retinanet_small_R_FPN.yaml" in SHAPES
    assert "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml" in COCO
    assert "COCO-Detection/retinanet_R_50_FPN_1x.yaml" in COCO


@pytest.mark.parametrize("path", COCO)
def test_coco_config_builds(path):
    cfg = get_config(path, tiny=False)
    assert cfg.DATASETS.TRAIN[0].startswith("coco_")
    assert cfg.MODEL.WEIGHTS == "" and "ImageNetPretrained" in get_raw_weights(path)
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 20e6  # a real R-50 model, not the CPU-sized one


def get_raw_weights(path):
    from detectron2.config import get_cfg

    from libraghm import add_libraghm_config

    cfg = add_libraghm_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIGS, path))
    return cfg.MODEL.WEIGHTS


def _assert_trains_a_step(cfg, path):
    """One training step on real images: finite losses, finite gradients for most parameters."""
    model = build_model(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    with EventStorage(0):
        losses = model(tiny_batch(2))
    assert len(losses) >= 2
    for name, value in losses.items():
        assert torch.isfinite(value).all(), (path, name, value)
    total = sum(losses.values())
    total.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert len(grads) > 0.5 * len(params)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("path", SHAPES)
def test_shapes_config_trains_a_step(path):
    _assert_trains_a_step(get_config(path), path)


@pytest.mark.parametrize("path", COCO)
def test_coco_config_trains_a_step_with_random_weights(path):
    """The real R-50 COCO models (80 classes, random weights) on small images, on the CPU."""
    cfg = get_config(path)
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.DEVICE == "cpu"
    _assert_trains_a_step(cfg, path)
