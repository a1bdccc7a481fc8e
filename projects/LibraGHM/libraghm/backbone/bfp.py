"""Balanced Feature Pyramid (Libra R-CNN, Pang et al., CVPR 2019) around a Detectron2 FPN.

The wrapped FPN's levels {P_l} are

1. *gathered*: each level is rescaled to the size of the reference level P_r (max pooling for
   finer levels, nearest interpolation for coarser ones) and averaged into the balanced semantic
   feature ``C = 1/L * sum_l resize(P_l)``;
2. *refined*: ``R = refine(C)`` with an embedded-Gaussian non-local block (paper default), a 3x3
   conv, or nothing;
3. *scattered*: ``R`` is rescaled back to every level's size (nearest interpolation for finer
   levels, max pooling for coarser ones) and added to that level: ``out_l = P_l + resize(R)``.

Rescaling ("strided" mode, the default; :func:`max_pool_to`, :func:`nearest_to`): levels differ
in stride by a power of two ``f``, and a level's size is ``ceil`` (Detectron2's stride-2 convs
and ``LastLevelMaxPool``) or ``floor`` of the finer size divided by ``f``. Max pooling uses
kernel = stride = ``f`` and nearest upsampling repeats every pixel ``f`` times, both cropped to
the exact target size, so coarse pixel ``p`` always covers fine pixels ``[p*f, p*f+f)`` as in
Detectron2's FPN top-down path, with a deterministic CUDA backward. Sizes that do not fit this
rule fall back to ``adaptive_max_pool2d`` (no deterministic CUDA backward) / size-based nearest
interpolation, which "adaptive" mode always uses, as mmdetection's BFP does; both modes give
identical results whenever every size divides exactly.

A single level is allowed: the formula then gives ``out = P + refine(P)`` (no special case).
"""

from typing import Dict, List, Optional

import torch.nn.functional as F
import fvcore.nn.weight_init as weight_init
from torch import Tensor, nn

from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone

from ..validation import Int, OneOf, cfg_node, check_head_inputs, check_params, config_keys
from .non_local import ATTENTION_IMPLS, NonLocal2d

__all__ = ["BalancedFeaturePyramid", "build_bfp_backbone", "max_pool_to", "nearest_to",
           "REFINE_TYPES", "RESIZE_MODES"]

REFINE_TYPES = ("non_local", "conv", "none")
RESIZE_MODES = ("strided", "adaptive")
#: Stride of the reference level when ``refine_level`` is -1 (P4 in the paper).
DEFAULT_REFINE_STRIDE = 16


def _power_of_two_ratio(num: int, den: int) -> Optional[int]:
    """``num // den`` if it is an exact power of two (1, 2, 4, ...), else None."""
    if den <= 0 or num % den:
        return None
    f = num // den
    return f if f & (f - 1) == 0 else None


def _to_size(x, size, factor, mode, fits, strided, by_size):
    """``strided(x)`` cropped to ``size`` where ``fits(source, target)`` holds in both dims (and
    the mode is "strided"), else ``by_size(x, size)``; ``x`` itself when it has the size."""
    th, tw = int(size[0]), int(size[1])
    h, w = x.shape[-2:]
    if (h, w) == (th, tw):
        return x
    if mode == "strided" and factor is not None and fits(h, th) and fits(w, tw):
        return strided(x)[..., :th, :tw]
    return by_size(x, (th, tw))


def max_pool_to(x: Tensor, size, factor: Optional[int], mode: str = "strided") -> Tensor:
    """
    Max-pool ``x`` down to exactly ``size``.

    Args:
        x (Tensor): (N, C, H, W).
        size (tuple[int, int]): target (h, w), smaller than or equal to (H, W).
        factor (int or None): the power-of-two stride ratio between the two levels, or None.
        mode (str): "strided": strided max pooling (kernel = stride = factor, ceil_mode, cropped to
            ``size``) when ``floor(S / factor) <= s <= ceil(S / factor)`` in both dims, else
            ``adaptive_max_pool2d``; "adaptive": always ``adaptive_max_pool2d``.

    Returns:
        Tensor: (N, C, h, w).
    """
    return _to_size(
        x, size, factor, mode,
        fits=lambda s, t: s // factor <= t <= -(-s // factor),
        strided=lambda y: F.max_pool2d(y, kernel_size=factor, stride=factor, ceil_mode=True),
        by_size=F.adaptive_max_pool2d,
    )


def nearest_to(x: Tensor, size, factor: Optional[int], mode: str = "strided") -> Tensor:
    """
    Nearest-upsample ``x`` to exactly ``size``.

    Args:
        x (Tensor): (N, C, H, W).
        size (tuple[int, int]): target (h, w), larger than or equal to (H, W).
        factor (int or None): the power-of-two stride ratio between the two levels, or None.
        mode (str): "strided": repeat each pixel ``factor`` times and crop to ``size`` when
            ``ceil(s / factor) == S`` in both dims, else size-based nearest ``F.interpolate``;
            "adaptive": always the size-based interpolation.

    Returns:
        Tensor: (N, C, h, w).
    """
    return _to_size(
        x, size, factor, mode,
        fits=lambda s, t: -(-t // factor) == s,
        strided=lambda y: F.interpolate(y, scale_factor=float(factor), mode="nearest"),
        by_size=lambda y, hw: F.interpolate(y, size=hw, mode="nearest"),
    )


class BalancedFeaturePyramid(Backbone):
    """
    Wraps a multi-level backbone (a Detectron2 FPN) and balances its levels (gather, average,
    refine, scatter, residual add). ``output_shape``, ``size_divisibility`` and
    ``padding_constraints`` are the wrapped backbone's (overriding Detectron2's ``Backbone``
    properties only to delegate).
    """

    #: Valid values of the arguments (and of the MODEL.BFP keys).
    PARAMS = {
        "refine_type": OneOf(*REFINE_TYPES),
        "refine_level": Int(low=-1),
        "resize_mode": OneOf(*RESIZE_MODES),
        "attention": OneOf(*ATTENTION_IMPLS),
    }

    def __init__(self, fpn: Backbone, refine_type: str = "non_local", refine_level: int = -1,
                 resize_mode: str = "strided", attention: str = "sdpa"):
        """
        Args:
            fpn (Backbone): the pyramid to balance; all its outputs need the same channels and
                distinct strides.
            refine_type (str): "non_local" (paper), "conv" (3x3 conv + ReLU) or "none".
            refine_level (int): index of the reference level among the outputs sorted by stride;
                -1: the level at stride 16 (the paper's P4).
            resize_mode (str): "strided" (default) or "adaptive" (mmdetection); see module doc.
            attention (str): the non-local block's attention, "sdpa" or "materialized"
                (see :func:`libraghm.backbone.non_local.embedded_gaussian_attention`).
        """
        super().__init__()
        check_params(self.PARAMS, refine_type=refine_type, refine_level=refine_level,
                     resize_mode=resize_mode, attention=attention)
        if not isinstance(fpn, Backbone):
            raise TypeError(f"fpn must be a detectron2 Backbone; got {type(fpn).__name__}.")
        shapes = fpn.output_shape()
        names = sorted(shapes, key=lambda k: shapes[k].stride)
        levels = {k: (shapes[k].stride, shapes[k].channels) for k in names}
        strides = [shapes[k].stride for k in names]
        channels = {shapes[k].channels for k in names}
        if not names or len(set(strides)) != len(strides) or len(channels) != 1:
            raise ValueError(
                f"fpn = {type(fpn).__name__} is invalid: the balanced levels need distinct strides "
                f"and equal channels (an FPN); got (stride, channels) per level {levels}."
            )
        if refine_level == -1:
            if DEFAULT_REFINE_STRIDE not in strides:
                raise ValueError(
                    f"refine_level = -1 is invalid here: it picks the level at stride "
                    f"{DEFAULT_REFINE_STRIDE}, but the levels are (stride, channels) {levels}; "
                    f"give an index in [0, {len(names) - 1}]."
                )
            refine_level = strides.index(DEFAULT_REFINE_STRIDE)
        elif refine_level >= len(names):
            raise ValueError(
                f"refine_level = {refine_level} is invalid: expected -1 (the level at stride "
                f"{DEFAULT_REFINE_STRIDE}) or an index in [0, {len(names) - 1}] into {names}."
            )
        c = channels.pop()
        self.fpn = fpn
        self.in_features = names
        self.refine_level = refine_level
        self.refine_type = refine_type
        self.resize_mode = resize_mode
        ref_stride = strides[refine_level]
        # Power-of-two ratio between each level's stride and the reference stride (None: other).
        self._factors = [_power_of_two_ratio(max(s, ref_stride), min(s, ref_stride))
                         for s in strides]
        if refine_type == "non_local":
            self.refine = NonLocal2d(c, attention=attention)
        elif refine_type == "conv":
            self.refine = Conv2d(c, c, kernel_size=3, padding=1, activation=F.relu)
            weight_init.c2_msra_fill(self.refine)
        else:
            self.refine = nn.Identity()

    def _resize(self, x: Tensor, size, i: int, pool: bool) -> Tensor:
        """Max-pool or upsample ``x`` to ``size``, between level ``i`` and the reference level."""
        return (max_pool_to if pool else nearest_to)(x, size, self._factors[i], self.resize_mode)

    def gather(self, features: List[Tensor]) -> Tensor:
        """
        Rescale every level to the reference level's size and average them.

        Args:
            features (list[Tensor]): the levels in stride order (as ``self.in_features``).

        Returns:
            Tensor: the balanced semantic feature, at the reference level's size.
        """
        r = self.refine_level
        total = features[r]
        for i, x in enumerate(features):
            if i != r:
                total = total + self._resize(x, features[r].shape[-2:], i, pool=i < r)
        return total / len(features)

    def scatter(self, balanced: Tensor, features: List[Tensor]) -> List[Tensor]:
        """
        Rescale the (refined) balanced feature to every level's size and add it to that level.

        Args:
            balanced (Tensor): at the reference level's size.
            features (list[Tensor]): the levels in stride order.

        Returns:
            list[Tensor]: ``features[i] + resize(balanced)``, in the same order.
        """
        r = self.refine_level
        return [x + (balanced if i == r else self._resize(balanced, x.shape[-2:], i, pool=i > r))
                for i, x in enumerate(features)]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x (Tensor): (N, C, H, W) images, padded as ``padding_constraints`` asks.

        Returns:
            dict[str, Tensor]: the wrapped backbone's outputs (same names, shapes), balanced.
        """
        feats = self.fpn(x)
        levels = [feats[k] for k in self.in_features]
        outs = dict(zip(self.in_features, self.scatter(self.refine(self.gather(levels)), levels)))
        return {k: outs[k] for k in feats}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return self.fpn.output_shape()

    @property
    def size_divisibility(self) -> int:
        return self.fpn.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return self.fpn.padding_constraints


@BACKBONE_REGISTRY.register()
def build_bfp_backbone(cfg, input_shape: ShapeSpec):
    """
    Build the FPN named by ``MODEL.BFP.FPN_BUILDER`` (any BACKBONE_REGISTRY builder: e.g.
    "build_resnet_fpn_backbone" for Faster R-CNN's P2-P6, "build_retinanet_resnet_fpn_backbone" for
    RetinaNet's P3-P7) and wrap it in a :class:`BalancedFeaturePyramid` configured by
    ``MODEL.BFP.{REFINE, REFINE_LEVEL, RESIZE_MODE, ATTENTION}``.

    Returns:
        BalancedFeaturePyramid
    """
    keys = {"refine_type": "MODEL.BFP.REFINE", "fpn": "MODEL.BFP.FPN_BUILDER"}
    keys.update({a: f"MODEL.BFP.{a.upper()}" for a in ("refine_level", "resize_mode", "attention")})
    args = {a: cfg_node(cfg, key) for a, key in keys.items() if a != "fpn"}
    # Check the cheap keys before building the inner network.
    check_params(BalancedFeaturePyramid.PARAMS, keys, **args)
    name = cfg.MODEL.BFP.FPN_BUILDER
    valid = sorted(k for k, _ in BACKBONE_REGISTRY if k != "build_bfp_backbone")
    if name not in valid:
        raise ValueError(f"MODEL.BFP.FPN_BUILDER = {name!r} is invalid: expected one of {valid}.")
    fpn = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    with config_keys("MODEL.BFP", keys):
        try:
            bfp = BalancedFeaturePyramid(fpn, **args)
        except ValueError as e:
            raise ValueError(
                str(e).replace(f"fpn = {type(fpn).__name__}", f"fpn = {name!r}")
            ) from e
    check_head_inputs(cfg, bfp.output_shape(), f"MODEL.BFP.FPN_BUILDER = {name!r}")
    return bfp
