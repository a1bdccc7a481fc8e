"""INPUT.SCALE_JITTER (EfficientDet's scale jitter): square training images at a random scale, keys checked."""
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T

import train_net
from conftest import get_config, spec_message
from libraghm.config import check_config
from libraghm.data.augmentation import SCALE_JITTER_PARAMS, build_train_augmentations

SHAPES = "Shapes-Detection/retinanet_small_R_FPN.yaml"


def test_off_by_default_keeps_detectron2s_mapper():
    assert build_train_augmentations(get_config(SHAPES)) is None


def test_resize_factor_spans_the_range_relative_to_the_square():
    cfg = get_config(SHAPES, "INPUT.SCALE_JITTER.ENABLED", True, "INPUT.SCALE_JITTER.SIZE", 160)
    augs = T.AugmentationList(build_train_augmentations(cfg))
    image = np.zeros((256, 320, 3), dtype=np.uint8)
    factors, shapes = [], set()
    for seed in range(300):
        np.random.seed(seed)
        inputs = T.AugInput(image.copy())
        transform = augs(inputs)
        shapes.add(inputs.image.shape[:2])
        resize = next(t for t in transform.transforms if isinstance(t, T.ResizeTransform))
        factors.append(resize.new_w / resize.w / (160 / 320))  # relative to "fits the square"
    assert shapes == {(160, 160)}  # cropped or padded to exactly the square
    factors = np.array(factors)
    assert factors.min() >= 0.1 - 0.01 and factors.max() <= 2.0 + 0.01
    assert (factors < 0.5).mean() > 0.1 and (factors > 1.5).mean() > 0.1  # uniform over [0.1, 2]


def test_training_loader_gives_square_images_with_boxes_inside():
    cfg = get_config(SHAPES, "INPUT.SCALE_JITTER.ENABLED", True, "INPUT.SCALE_JITTER.SIZE", 160,
                     "SEED", 3)
    batch = next(iter(train_net.Trainer.build_train_loader(cfg)))
    for sample in batch:
        assert tuple(sample["image"].shape[1:]) == (160, 160)
        boxes = sample["instances"].gt_boxes.tensor
        assert torch.all(boxes >= 0) and torch.all(boxes <= 160)
        assert torch.all(sample["instances"].gt_boxes.area() > 0)


@pytest.mark.parametrize("key,value", [
    ("ENABLED", "yes"), ("MIN_SCALE", 0.0), ("MAX_SCALE", -1.0), ("SIZE", 1.5), ("SIZE", -32)])
def test_bad_key_fails_at_setup_naming_it(key, value):
    """Set from Python (yacs checks types only when merging files and lists)."""
    cfg = get_config(SHAPES)
    cfg.INPUT.SCALE_JITTER[key] = value
    with pytest.raises(ValueError) as err:
        check_config(cfg)
    assert str(err.value) == spec_message(f"INPUT.SCALE_JITTER.{key}", SCALE_JITTER_PARAMS[key.lower()], value)


def test_max_below_min_fails_naming_both():
    cfg = get_config(SHAPES, "INPUT.SCALE_JITTER.MIN_SCALE", 1.0, "INPUT.SCALE_JITTER.MAX_SCALE", 0.5)
    with pytest.raises(ValueError, match=r"INPUT\.SCALE_JITTER\.MAX_SCALE = 0\.5 is invalid: .*MIN_SCALE \(1\.0\)"):
        check_config(cfg)


@pytest.mark.parametrize("name,size", [("d0", 512), ("lite0", 320), ("lite1", 384), ("lite2", 448)])
def test_coco_efficientdet_configs_jitter_at_the_presets_size(name, size):
    augs = build_train_augmentations(get_config(f"COCO-Detection/efficientdet_{name}.yaml", tiny=False))
    resize, crop = augs[0], augs[1]
    assert isinstance(resize, T.ResizeScale) and (resize.min_scale, resize.max_scale) == (0.1, 2.0)
    assert isinstance(crop, T.FixedSizeCrop) and tuple(crop.crop_size) == (size, size)
