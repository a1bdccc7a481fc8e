"""Training augmentations beyond Detectron2's yaml keys: EfficientDet's scale jitter.

    INPUT.SCALE_JITTER.ENABLED: True
    INPUT.SCALE_JITTER.MIN_SCALE: 0.1    # EfficientDet's range
    INPUT.SCALE_JITTER.MAX_SCALE: 2.0
    INPUT.SCALE_JITTER.SIZE: 0           # the square training size; 0 = max(INPUT.MIN_SIZE_TRAIN)

Each training image is resized so that it fits a ``SIZE`` x ``SIZE`` square times a scale drawn
uniformly from ``[MIN_SCALE, MAX_SCALE]`` (Detectron2's ``ResizeScale``), then cropped at a random
place, or padded, to exactly ``SIZE`` x ``SIZE`` (``FixedSizeCrop``; boxes cut by the crop are
clipped, boxes left empty are dropped), then flipped as ``INPUT.RANDOM_FLIP`` says. Test images
are resized as usual. Detectron2's large-scale-jitter baselines use the same two augmentations.
"""
from typing import List, Optional

from detectron2.data import transforms as T

from ..validation import Bool, Float, Int, read_params

__all__ = ["SCALE_JITTER_PARAMS", "build_train_augmentations"]

#: Valid values of INPUT.SCALE_JITTER.<KEY>.
SCALE_JITTER_PARAMS = {
    "enabled": Bool(),
    "min_scale": Float(low=0.0, low_open=True),
    "max_scale": Float(low=0.0, low_open=True),
    "size": Int(low=0),
}


def build_train_augmentations(cfg) -> Optional[List[T.Augmentation]]:
    """
    Args:
        cfg (CfgNode): a config with LibraGHM's keys.

    Returns:
        list[Augmentation] or None: the scale-jitter training augmentations, or None when
        ``INPUT.SCALE_JITTER.ENABLED`` is False (Detectron2's own ``ResizeShortestEdge`` + flip).

    Raises:
        ValueError: naming the key, for an invalid value or ``MAX_SCALE < MIN_SCALE``.
    """
    p = read_params(cfg, "INPUT.SCALE_JITTER", SCALE_JITTER_PARAMS)
    if p["max_scale"] < p["min_scale"]:
        raise ValueError(
            f"INPUT.SCALE_JITTER.MAX_SCALE = {p['max_scale']} is invalid: expected a number >= "
            f"INPUT.SCALE_JITTER.MIN_SCALE ({p['min_scale']})."
        )
    if not p["enabled"]:
        return None
    size = p["size"] or max(cfg.INPUT.MIN_SIZE_TRAIN)
    augs = [
        T.ResizeScale(p["min_scale"], p["max_scale"], target_height=size, target_width=size),
        T.FixedSizeCrop((size, size)),
    ]
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    return augs
