"""Every config in configs/ loads and builds with the current keys only; every config (built-in dataset and
COCO) trains a step with finite losses; LibraGHM 0.1's keys and class names fail naming their replacement."""
import glob
import os

import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, get_config, tiny_batch
from libraghm import add_libraghm_config, model_zoo
from libraghm.config import RENAMED_KEYS

EVERY_YAML = sorted(
    os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
)
BASES = [p for p in EVERY_YAML if os.path.basename(p).startswith("Base-")]
ALL = [p for p in EVERY_YAML if p not in BASES]
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
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.MODEL.META_ARCHITECTURE == "EfficientDet":
        # the preset's EfficientNet + BiFPN + head (test_efficientdet.py checks the paper's counts)
        assert cfg.MODEL.EFFICIENTDET.PRESET and n_params > 3e6
        return
    assert cfg.MODEL.WEIGHTS == "" and "ImageNetPretrained" in get_raw_weights(path)
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


# --------------------------------------------------------------------------------------------------
# Current keys only; old keys and class names fail naming what replaced them
# --------------------------------------------------------------------------------------------------
# LibraGHM 0.1's class names (written out here, not read from the package) and what replaced them.
OLD_CLASSES = {
    "LibraROIHeads": ("MODEL.ROI_HEADS.NAME", ["LibraGHMROIHeads", "MODEL.ROI_HEADS.SAMPLER"]),
    "OHEMROIHeads": ("MODEL.ROI_HEADS.NAME", ["LibraGHMROIHeads", "OHEMSampler"]),
    "LibraRPN": ("MODEL.PROPOSAL_GENERATOR.NAME", ["LibraGHMRPN", "MODEL.RPN.SAMPLER"]),
    "GHMRPN": ("MODEL.PROPOSAL_GENERATOR.NAME", ["LibraGHMRPN", "OBJECTNESS_LOSS_TYPE: ghm_c", "NoSampling"]),
    "GHMRetinaNet": ("MODEL.META_ARCHITECTURE", ["LibraGHMRetinaNet", "CLS_LOSS_TYPE: ghm_c"]),
}
# What is left under LIBRAGHM (settings of no model part).
LIBRAGHM_KEYS = {"COCO_DATASETS", "CLIP_GRAD_NORM", "LOG_PERIOD"}


def _leaves(node, prefix=""):
    """(full key, value) of every entry of a yaml mapping, nodes and leaves alike."""
    for k, v in node.items():
        key = f"{prefix}{k}"
        yield key, v
        if isinstance(v, dict):
            yield from _leaves(v, key + ".")


def _empty_cfg():
    return add_libraghm_config(get_cfg())


def test_config_lists_are_complete():
    assert "Shapes-Detection/Base-Shapes-RCNN-FPN.yaml" in BASES and "Base-RetinaNet.yaml" in BASES
    assert len(ALL) == len(SHAPES) + len(COCO) and len(SHAPES) >= 16 and len(COCO) >= 14
    assert {"LIBRAGHM.GHMC.BINS", "LIBRAGHM.ROI_SAMPLER.NAME"} <= set(RENAMED_KEYS)
    assert "MODEL.GHM_C.BINS" not in RENAMED_KEYS


@pytest.mark.parametrize("path", EVERY_YAML)
def test_config_file_uses_no_old_key_or_class_name(path):
    """The file as written (not its merged result): no renamed key, nothing under LIBRAGHM that moved, no old
    class name; and it merges, with its _BASE_ chain, onto LibraGHM's defaults."""
    with open(os.path.join(CONFIGS, path)) as f:
        raw = yaml.safe_load(f)
    entries = list(_leaves(raw))
    assert entries, path
    for key, value in entries:
        assert key not in RENAMED_KEYS, (path, key, RENAMED_KEYS.get(key))
        if key.startswith("LIBRAGHM."):
            assert key.split(".")[1] in LIBRAGHM_KEYS, (path, key)
        assert not (isinstance(value, str) and value in OLD_CLASSES), (path, key, value)
    cfg = _empty_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, path))
    for old, (key, _) in OLD_CLASSES.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node != old, (path, key)


@pytest.mark.parametrize("path", ALL)
def test_config_loads_by_name_through_the_model_zoo(path):
    """``model_zoo.get_config`` (the documented entry point) accepts every config: merged and checked."""
    cfg = model_zoo.get_config(path)
    assert cfg.MODEL.META_ARCHITECTURE in ("GeneralizedRCNN", "RetinaNet", "LibraGHMRetinaNet", "EfficientDet")


@pytest.mark.parametrize("path", BASES)
def test_base_config_builds(path):
    """The base configs are models too (the stock baselines' parents): they build as they are."""
    cfg = get_config(path, tiny=False)
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1e5


# (an old LIBRAGHM node and one of its leaves as a yaml file sets it, the new key named, a note that must follow)
OLD_YAML_KEYS = [
    ("GHMC", {"BINS": 10}, "MODEL.GHM_C", None),
    ("GHMR", {"MU": 0.02}, "MODEL.GHM_R", None),
    ("ROI_SAMPLER", {"NAME": "IoUBalancedSampler"}, "MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER", "MODEL.ROI_HEADS.SAMPLER"),
    ("RPN_SAMPLER", {"NUM_BINS": 3}, "MODEL.RPN.IOU_BALANCED_SAMPLER", "MODEL.RPN.SAMPLER"),
    ("OHEM", {"MODE": "mmdet"}, "MODEL.ROI_HEADS.OHEM", "OHEMSampler"),
    ("BALANCED_L1", {"BETA": 0.11}, "MODEL.BALANCED_L1", None),
    ("GHM_RETINANET", {"CLS_LOSS_TYPE": "ghm_c"}, "MODEL.RETINANET.CLS_LOSS_TYPE", None),
    ("GHM_RPN", {"SUBSAMPLE": False}, "MODEL.RPN.SAMPLER", None),
    ("BFP", {"REFINE": "conv"}, "MODEL.BFP", None),
    ("BIFPN", {"GN_NUM_GROUPS": 8}, "MODEL.BIFPN", None),
    ("SMALL_RESNET", {"WIDTHS": [8, 16, 32, 64]}, "MODEL.SMALL_RESNET", None),
]


def _yaml_over(tmp_path, base, body):
    """A user's yaml file: ``_BASE_`` a shipped config, plus ``body`` (a nested dict)."""
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump({"_BASE_": os.path.join(CONFIGS, base), **body}))
    return str(path)


@pytest.mark.parametrize("node,leaf,new_key,note", OLD_YAML_KEYS, ids=[k[0] for k in OLD_YAML_KEYS])
def test_yaml_with_an_old_key_fails_naming_the_new_key(tmp_path, node, leaf, new_key, note):
    """A user's yaml written for LibraGHM 0.1 (on top of a shipped config) fails at merge time, naming the new key."""
    path = _yaml_over(tmp_path, "Shapes-Detection/libra_faster_rcnn.yaml", {"LIBRAGHM": {node: leaf}})
    with pytest.raises(KeyError) as info:
        _empty_cfg().merge_from_file(path)
    message = str(info.value)
    assert f"renamed to {new_key}" in message, message
    if note:
        assert note in message, message


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_every_old_key_on_the_command_line_fails_naming_the_new_key(old):
    new = RENAMED_KEYS[old]
    new = new[0] if isinstance(new, tuple) else new
    assert new.startswith("MODEL.") and not new.startswith("MODEL.LIBRAGHM")
    cfg = _empty_cfg()
    # the new key exists (a node or a leaf of the defaults)
    node = cfg
    for part in new.split("."):
        assert part in node, (old, new)
        node = node[part]
    with pytest.raises(KeyError, match=f"Key {old} was renamed to {new};"):
        cfg.merge_from_list([old, "1"])


@pytest.mark.parametrize("old", sorted(OLD_CLASSES))
def test_old_class_name_fails_at_build_naming_the_replacement(tmp_path, old):
    key, replacement = OLD_CLASSES[old]
    base = "Shapes-Detection/ghm_retinanet.yaml" if "RetinaNet" in old else "Shapes-Detection/libra_faster_rcnn.yaml"
    body = old
    for part in reversed(key.split(".")):
        body = {part: body}
    cfg = get_config(_yaml_over(tmp_path, base, body))  # a yaml file naming the old class merges ...
    node = cfg
    for part in key.split("."):
        node = node[part]
    assert node == old
    with pytest.raises(ValueError) as info:  # ... and the build says what replaced it
        build_model(cfg)
    message = str(info.value)
    assert old in message and all(r in message for r in replacement), message
