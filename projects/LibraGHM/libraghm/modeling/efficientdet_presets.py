"""EfficientDet's compound-scaling presets (D0..D7, Lite0..Lite4) and the rule that applies them.

``MODEL.EFFICIENTDET.PRESET`` names one row of :data:`EFFICIENTDET_PRESETS`. The rule, in one place:

* :func:`apply_efficientdet_preset` is called when the config is set up, after the yaml file and
  the command line are merged (``train_net.py``'s ``setup`` and ``libraghm.model_zoo.get_config``
  do it). With a preset, it writes the preset's value into every key of :data:`GOVERNED_KEYS`,
  except the keys listed in ``MODEL.EFFICIENTDET.OVERRIDES``, which keep the config's value.
* yacs cannot tell a value written in a file from a default. A governed key that is not in
  ``OVERRIDES`` and holds a value other than both its default and the preset's value was set on
  purpose: it fails (naming the key and the fix), instead of being silently replaced. A value equal
  to the default is replaced.
* ``PRESET: ""`` touches nothing: every key is used as the config says (``OVERRIDES`` must then
  be empty).
* Building the model (:class:`~libraghm.modeling.efficientdet.EfficientDet`) fails if a preset is
  set and a governed key the model reads, not in ``OVERRIDES``, does not hold the preset's value:
  the preset was not applied (or a key was changed afterwards), so it is never half-applied.

The values are those of the paper's Table 1 (D0..D7) and of the reference implementations' Lite
models; see docs/efficientdet.md.
"""
import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from ..validation import cfg_node

__all__ = [
    "EfficientDetPreset", "EFFICIENTDET_PRESETS", "GOVERNED_KEYS", "DATA_KEYS", "preset_values",
    "apply_efficientdet_preset", "check_efficientdet_preset",
]

#: ImageNet mean / std of the EfficientNet-B weights (RGB, 0..255).
IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


@dataclass(frozen=True)
class EfficientDetPreset:
    """
    One compound-scaling point.

    Attributes:
        backbone (str): ``MODEL.EFFICIENTNET.NAME``.
        width (int): BiFPN channels ``W_bifpn`` (also the head's).
        repeats (int): BiFPN layers ``D_bifpn``.
        box_class_repeats (int): convs of the class / box nets ``D_box = D_class``.
        input_size (int): input resolution ``R_input``.
        anchor_scale (float): anchor size at level ``l`` is ``anchor_scale * 2**l * 2**(k/3)``.
        fusion (str): BiFPN fusion, "fast" (fast normalised) or "sum".
        activation (str): "silu" (swish) or "relu6", in the BiFPN and the head.
        lite (bool): an EfficientDet-Lite model (EfficientNet-Lite backbone, inputs in [-1, 1]).
    """

    backbone: str
    width: int
    repeats: int
    box_class_repeats: int
    input_size: int
    anchor_scale: float
    fusion: str
    activation: str
    lite: bool


def _d(phi, width, repeats, backbone, input_size, anchor_scale=4.0, fusion="fast"):
    # D_box = D_class = 3 + floor(phi / 3); W_bifpn and D_bifpn as rounded in the paper's Table 1
    return EfficientDetPreset(backbone, width, repeats, 3 + phi // 3, input_size, anchor_scale,
                              fusion, "silu", False)


def _lite(backbone, width, repeats, box_class_repeats, input_size, anchor_scale):
    return EfficientDetPreset(backbone, width, repeats, box_class_repeats, input_size,
                              anchor_scale, "sum", "relu6", True)


#: Preset name -> values. D6 and D7 use unweighted ("sum") fusion for training stability, as the
#: reference implementation does; D7 reuses B6 with a larger input and anchor scale 5. Lite3 and
#: Lite4 keep anchor scale 4 (the reference's Lite configs set 3 only for Lite0-2).
EFFICIENTDET_PRESETS: Dict[str, EfficientDetPreset] = {
    "D0": _d(0, 64, 3, "b0", 512),
    "D1": _d(1, 88, 4, "b1", 640),
    "D2": _d(2, 112, 5, "b2", 768),
    "D3": _d(3, 160, 6, "b3", 896),
    "D4": _d(4, 224, 7, "b4", 1024),
    "D5": _d(5, 288, 7, "b5", 1280),
    "D6": _d(6, 384, 8, "b6", 1280, fusion="sum"),
    "D7": _d(7, 384, 8, "b6", 1536, anchor_scale=5.0, fusion="sum"),
    "Lite0": _lite("lite0", 64, 3, 3, 320, 3.0),
    "Lite1": _lite("lite1", 88, 4, 3, 384, 3.0),
    "Lite2": _lite("lite2", 112, 5, 3, 448, 3.0),
    "Lite3": _lite("lite3", 160, 6, 4, 512, 4.0),
    "Lite4": _lite("lite4", 224, 7, 4, 640, 4.0),
}

LEVELS = range(3, 8)  # P3-P7

#: Every key a preset writes, in order.
GOVERNED_KEYS: Tuple[str, ...] = (
    "MODEL.BACKBONE.NAME",
    "MODEL.EFFICIENTNET.NAME",
    "MODEL.BIFPN.BOTTOM_UP",
    "MODEL.BIFPN.IN_FEATURES",
    "MODEL.BIFPN.TOP_LEVEL",
    "MODEL.BIFPN.WIDTH",
    "MODEL.BIFPN.REPEATS",
    "MODEL.BIFPN.FUSION",
    "MODEL.BIFPN.ACTIVATION",
    "MODEL.BIFPN.SIZE_DIVISIBILITY",
    "MODEL.EFFICIENTDET.BOX_CLASS_REPEATS",
    "MODEL.EFFICIENTDET.ACTIVATION",
    "MODEL.RETINANET.IN_FEATURES",
    "MODEL.RETINANET.IOU_THRESHOLDS",
    "MODEL.RETINANET.IOU_LABELS",
    "MODEL.RETINANET.BBOX_REG_WEIGHTS",
    "MODEL.RETINANET.CLS_LOSS_TYPE",
    "MODEL.RETINANET.FOCAL_LOSS_ALPHA",
    "MODEL.RETINANET.FOCAL_LOSS_GAMMA",
    "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
    "MODEL.HUBER.DELTA",
    "MODEL.HUBER.LOSS_WEIGHT",
    "MODEL.ANCHOR_GENERATOR.NAME",
    "MODEL.ANCHOR_GENERATOR.SIZES",
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    "MODEL.ANCHOR_GENERATOR.OFFSET",
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "INPUT.FORMAT",
    "INPUT.MIN_SIZE_TRAIN",
    "INPUT.MAX_SIZE_TRAIN",
    "INPUT.MIN_SIZE_TEST",
    "INPUT.MAX_SIZE_TEST",
)
#: Governed keys only the data pipeline reads: written by :func:`apply_efficientdet_preset`, not
#: checked when the model is built.
DATA_KEYS: Tuple[str, ...] = (
    "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST",
)


def preset_values(name: str) -> Dict[str, Any]:
    """
    Args:
        name (str): a key of :data:`EFFICIENTDET_PRESETS`.

    Returns:
        dict: governed key -> the preset's value, for every key of :data:`GOVERNED_KEYS`.
    """
    p = _preset(name, "name")
    values = {
        "MODEL.BACKBONE.NAME": "build_bifpn_backbone",
        "MODEL.EFFICIENTNET.NAME": p.backbone,
        "MODEL.BIFPN.BOTTOM_UP": "build_efficientnet_backbone",
        "MODEL.BIFPN.IN_FEATURES": ["res3", "res4", "res5"],
        "MODEL.BIFPN.TOP_LEVEL": 7,
        "MODEL.BIFPN.WIDTH": p.width,
        "MODEL.BIFPN.REPEATS": p.repeats,
        "MODEL.BIFPN.FUSION": p.fusion,
        "MODEL.BIFPN.ACTIVATION": p.activation,
        # inputs padded to a multiple of 32 only (the backbone's stride): the BiFPN resamples to
        # exact sizes, so Lite0's 320 gives P7 3 x 3 as in the reference, not 384 px of padding
        "MODEL.BIFPN.SIZE_DIVISIBILITY": 32,
        "MODEL.EFFICIENTDET.BOX_CLASS_REPEATS": p.box_class_repeats,
        "MODEL.EFFICIENTDET.ACTIVATION": p.activation,
        "MODEL.RETINANET.IN_FEATURES": [f"p{lv}" for lv in LEVELS],
        # IoU >= 0.5 positive, below negative, no ignored band (plus each box's best anchor)
        "MODEL.RETINANET.IOU_THRESHOLDS": [0.5],
        "MODEL.RETINANET.IOU_LABELS": [0, 1],
        "MODEL.RETINANET.BBOX_REG_WEIGHTS": (1.0, 1.0, 1.0, 1.0),
        "MODEL.RETINANET.CLS_LOSS_TYPE": "focal",
        "MODEL.RETINANET.FOCAL_LOSS_ALPHA": 0.25,
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA": 1.5,
        "MODEL.RETINANET.BBOX_REG_LOSS_TYPE": "huber",
        "MODEL.HUBER.DELTA": 0.1,
        "MODEL.HUBER.LOSS_WEIGHT": 12.5,  # 50 over 4 coordinates: see libraghm/losses/huber_loss.py
        "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
        "MODEL.ANCHOR_GENERATOR.SIZES": [
            [p.anchor_scale * 2**lv * 2 ** (k / 3) for k in range(3)] for lv in LEVELS
        ],
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
        "MODEL.ANCHOR_GENERATOR.OFFSET": 0.5,  # anchor centres at (i + 0.5) * stride
        "MODEL.PIXEL_MEAN": [127.5] * 3 if p.lite else list(IMAGENET_MEAN),
        "MODEL.PIXEL_STD": [127.5] * 3 if p.lite else list(IMAGENET_STD),
        "INPUT.FORMAT": "RGB",
        # the longer side resized to input_size (padded, not to a square but to a multiple of 128)
        "INPUT.MIN_SIZE_TRAIN": (p.input_size,),
        "INPUT.MAX_SIZE_TRAIN": p.input_size,
        "INPUT.MIN_SIZE_TEST": p.input_size,
        "INPUT.MAX_SIZE_TEST": p.input_size,
    }
    assert tuple(values) == GOVERNED_KEYS
    return values


def _preset(name, key) -> EfficientDetPreset:
    if not isinstance(name, str) or name not in EFFICIENTDET_PRESETS:
        raise ValueError(
            f"{key} = {name!r} is invalid: expected '' (no preset) or one of "
            f"{', '.join(repr(n) for n in EFFICIENTDET_PRESETS)}."
        )
    return EFFICIENTDET_PRESETS[name]


def _plain(value):
    """Tuples as lists, recursively (yacs keeps either), for comparisons."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(a, b) -> bool:
    return _plain(a) == _plain(b)


def _read_preset(cfg) -> Tuple[str, List[str]]:
    """The checked ``MODEL.EFFICIENTDET.PRESET`` and ``OVERRIDES``."""
    name = cfg.MODEL.EFFICIENTDET.PRESET
    overrides = cfg.MODEL.EFFICIENTDET.OVERRIDES
    if name != "":
        _preset(name, "MODEL.EFFICIENTDET.PRESET")
    if not isinstance(overrides, (list, tuple)) or not all(
            isinstance(k, str) and k in GOVERNED_KEYS for k in overrides):
        raise ValueError(
            f"MODEL.EFFICIENTDET.OVERRIDES = {overrides!r} is invalid: expected a list of keys a "
            f"preset governs, among {', '.join(GOVERNED_KEYS)}."
        )
    if overrides and name == "":
        raise ValueError(
            f"MODEL.EFFICIENTDET.OVERRIDES = {list(overrides)!r} is invalid with "
            "MODEL.EFFICIENTDET.PRESET = '': it lists keys that keep their value over a preset's, "
            "and without a preset every key keeps its value; empty it or set a preset."
        )
    return name, list(overrides)


@functools.lru_cache(maxsize=1)
def _defaults():
    from detectron2.config import get_cfg

    from ..config import add_libraghm_config

    cfg = add_libraghm_config(get_cfg())
    return {k: cfg_node(cfg, k) for k in GOVERNED_KEYS}


def _set(cfg, key: str, value) -> None:
    node, leaf = key.rsplit(".", 1)
    cfg_node(cfg, node)[leaf] = value


def apply_efficientdet_preset(cfg):
    """
    Apply ``MODEL.EFFICIENTDET.PRESET`` to a config, in place (the rule is in the module
    docstring). Call it after merging the yaml file and the command line, before building anything.
    Idempotent.

    Args:
        cfg (CfgNode): a config with LibraGHM's keys, not frozen.

    Returns:
        CfgNode: the same ``cfg``.

    Raises:
        ValueError: an unknown preset (naming the valid ones), bad ``OVERRIDES``, a preset on a
            meta-architecture other than EfficientDet, or a governed key set to a value that
            conflicts with the preset (naming the key, both values and the fix).
    """
    name, overrides = _read_preset(cfg)
    if not name:
        return cfg
    from detectron2.modeling import META_ARCH_REGISTRY

    from .efficientdet import EfficientDet

    meta = cfg.MODEL.META_ARCHITECTURE
    cls = META_ARCH_REGISTRY.get(meta) if meta in META_ARCH_REGISTRY else None
    if not (isinstance(cls, type) and issubclass(cls, EfficientDet)):
        raise ValueError(
            f"MODEL.EFFICIENTDET.PRESET = {name!r} needs MODEL.META_ARCHITECTURE: EfficientDet; "
            f"this config has {meta!r}, which would ignore part of the preset."
        )
    defaults = _defaults()
    values = preset_values(name)
    for key, value in values.items():
        if key in overrides:
            continue
        current = cfg_node(cfg, key)
        if _same(current, value):
            continue
        if not _same(current, defaults[key]):
            raise ValueError(
                f"{key} = {current!r} conflicts with MODEL.EFFICIENTDET.PRESET = {name!r}, which "
                f"sets it to {value!r}: remove it from the config, add {key!r} to "
                "MODEL.EFFICIENTDET.OVERRIDES to keep it, or set the preset '' and write every "
                "key yourself."
            )
        _set(cfg, key, value)
    return cfg


def check_efficientdet_preset(cfg) -> str:
    """
    Check, when the model is built, that the preset (if any) was applied: every governed key the
    model reads (all but :data:`DATA_KEYS`) and that is not in ``OVERRIDES`` holds the preset's
    value.

    Args:
        cfg (CfgNode): the config the model is built from.

    Returns:
        str: the preset's name, or "".

    Raises:
        ValueError: naming the preset, the first key that differs, both values and the fix.
    """
    name, overrides = _read_preset(cfg)
    if not name:
        return name
    for key, value in preset_values(name).items():
        if key in DATA_KEYS or key in overrides:
            continue
        current = cfg_node(cfg, key)
        if not _same(current, value):
            raise ValueError(
                f"MODEL.EFFICIENTDET.PRESET = {name!r} is set but {key} = {current!r} is not the "
                f"preset's value {value!r}: the preset was not applied. Call "
                "libraghm.modeling.apply_efficientdet_preset(cfg) after merging the config (as "
                "train_net.py and libraghm.model_zoo.get_config do), or add "
                f"{key!r} to MODEL.EFFICIENTDET.OVERRIDES to keep this value."
            )
    return name
