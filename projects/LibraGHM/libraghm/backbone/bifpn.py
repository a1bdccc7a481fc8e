"""BiFPN (EfficientDet, Tan, Pang and Le, CVPR 2020) as a Detectron2 backbone wrapper.

:class:`BiFPN` wraps any Detectron2 bottom-up :class:`Backbone` (a ResNet by default) and builds a
bidirectional feature pyramid over a contiguous range of levels ``P_min .. P_max``:

* Levels the bottom-up provides come from ``MODEL.BIFPN.IN_FEATURES`` (e.g. res3..res5 = P3..P5);
  levels above them are made from the top input as in EfficientDet:
  ``P6 = maxpool(norm(conv1x1(C5)))`` (the 1x1 conv + norm only where the channels differ from the
  width) and ``P7 = maxpool(P6)``.
* One BiFPN layer is a top-down pass followed by a bottom-up pass (:func:`bifpn_graph` gives the
  graph as data). Every node fuses its inputs (fast normalised fusion by default:
  ``out = sum_i relu(w_i) x_i / (eps + sum_j relu(w_j))``, ``eps = 1e-4``, ``w_i = 1`` at
  init), then applies swish, a depthwise-separable 3x3 conv and BatchNorm (PyTorch momentum
  0.01, eps 1e-3). Each edge resamples its input to the exact size of the target level (nearest
  upsampling with ``interpolate(size=...)``, 3x3 stride-2 max-pool downsampling followed by a
  crop / pad when the pooled size is off by one), so every input size works, not only multiples
  of the top stride. The max-pool pads as TensorFlow's "SAME" (EfficientDet's): on an
  even-sized input the window starts at the first row and the extra padding is at the bottom /
  right. ``POOL_PADDING: symmetric`` pads 1 on every side instead (PyTorch ports that train from
  scratch), which shifts every pooling window by one pixel on even sizes: a different function,
  not only a different initialisation. As in EfficientDet, an edge whose input has other than
  ``width`` channels (only the bottom-up inputs of the first layer) gets its own 1x1 conv + norm.
* The layer is repeated ``REPEATS`` times at width ``WIDTH`` (EfficientDet's D0..D7 values are in
  :data:`libraghm.modeling.efficientdet_presets.EFFICIENTDET_PRESETS`; the whole detector's
  ``MODEL.EFFICIENTDET.PRESET`` sets them).

Deviations from the reference implementation that do not change the function the network can
compute: a conv followed by a norm has no bias (the norm removes it), and convs are initialised
with Detectron2's ``c2_xavier_fill`` like Detectron2's FPN (a different starting point).

The forward pass uses plain lists and ``ModuleList`` iteration only, so the whole backbone can be
compiled with ``torch.jit.script`` and exported with ``torch.onnx.export``.
"""

import math
from typing import Callable, Dict, List, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone

from ..events import checked_log_period, storage_to_log
from ..validation import (Bool, Float, Int, OneOf, StrList, check_head_inputs, check_params,
                          config_keys)

__all__ = [
    "BiFPN", "BiFPNLayer", "BiFPNNeck", "BiFPNNode", "FastNormalizedFusion",
    "Resample", "SoftmaxFusion", "SumFusion", "bifpn_graph", "bifpn_output_ids",
    "build_bifpn_backbone",
]

POOL_PADDINGS = ("same", "symmetric")
# "relu6": EfficientDet-Lite's activation (quantisation-friendly).
ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6, "": nn.Identity}


def _no_norm(channels: int) -> None:
    return None


def bifpn_graph(num_levels: int) -> List[Tuple[int, List[int]]]:
    """
    The nodes of one BiFPN layer over ``num_levels`` contiguous levels.

    Node ids ``0 .. num_levels - 1`` are the layer's inputs (finest level first); the k-th node
    returned gets id ``num_levels + k``. The top-down pass adds one node per level from the
    second-coarsest down to the finest (inputs: the level's input and the coarser node); the
    bottom-up pass adds one node per level from the second-finest up to the coarsest (inputs: the
    level's input, the level's top-down node where there is one, and the finer node). For 5 levels
    this is EfficientDet's graph: P6td(P6, P7), P5td(P5, P6td), P4td(P4, P5td), P3out(P3, P4td),
    P4out(P4, P4td, P3out), P5out(P5, P5td, P4out), P6out(P6, P6td, P5out), P7out(P7, P6out).

    Args:
        num_levels (int): number of pyramid levels, at least 2.

    Returns:
        list[tuple[int, list[int]]]: per node, (target level index, 0 = finest; input node ids).
    """
    if num_levels < 2:
        raise ValueError(f"A BiFPN needs at least 2 levels; got {num_levels}.")
    top = num_levels - 1
    nodes: List[Tuple[int, List[int]]] = []
    top_down_id: Dict[int, int] = {}
    prev = top
    for level in range(top - 1, -1, -1):
        nodes.append((level, [level, prev]))
        prev = top_down_id[level] = num_levels + len(nodes) - 1
    for level in range(1, num_levels):
        nodes.append((level, [level] + ([top_down_id[level]] if level < top else []) + [prev]))
        prev = num_levels + len(nodes) - 1
    return nodes


def bifpn_output_ids(graph: Sequence[Tuple[int, Sequence[int]]], num_levels: int) -> List[int]:
    """
    Args:
        graph: nodes as returned by :func:`bifpn_graph`.
        num_levels (int): number of levels.

    Returns:
        list[int]: per level (finest first), the id of the last node computing it (the output).
    """
    out = list(range(num_levels))
    for k, (level, _) in enumerate(graph):
        out[level] = num_levels + k
    return out


class _WeightedFusion(nn.Module):
    """
    The sum of ``num_inputs`` same-shaped tensors weighted by :meth:`normalized_weights` (defined
    by subclasses) of one learnt weight per input, 1 at init.
    """

    def __init__(self, num_inputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))

    def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            xs (list[Tensor]): same-shaped tensors.

        Returns:
            Tensor: their weighted sum.
        """
        w = self.normalized_weights()
        out = xs[0] * w[0]
        for i in range(1, len(xs)):
            out = out + xs[i] * w[i]
        return out


class FastNormalizedFusion(_WeightedFusion):
    """
    EfficientDet's fast normalised fusion, ``sum_i relu(w_i) x_i / (eps + sum_j relu(w_j))``, of
    ``num_inputs`` tensors; ``eps``: 1e-4 in the paper.
    """

    eps: torch.jit.Final[float]

    def __init__(self, num_inputs: int, eps: float = 1e-4):
        super().__init__(num_inputs)
        self.eps = eps

    def normalized_weights(self) -> torch.Tensor:
        w = F.relu(self.weight)
        return w / (w.sum() + self.eps)


class SoftmaxFusion(_WeightedFusion):
    """Softmax-based fusion: ``sum_i softmax(w)_i x_i`` (EfficientDet's slower variant)."""

    def normalized_weights(self) -> torch.Tensor:
        return torch.softmax(self.weight, dim=0)


class SumFusion(nn.Module):
    """Unweighted fusion: the plain sum of the inputs (no parameters)."""

    def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            xs (list[Tensor]): same-shaped tensors.

        Returns:
            Tensor: their sum.
        """
        out = xs[0]
        for i in range(1, len(xs)):
            out = out + xs[i]
        return out


class Resample(nn.Module):
    """
    One BiFPN edge: an optional 1x1 conv + norm (where channels differ), then resampling to the
    target's exact spatial size.
    """

    direction: torch.jit.Final[int]
    same_padding: torch.jit.Final[bool]

    def __init__(self, in_channels: int, out_channels: int, direction: int, norm: Callable,
                 pool_padding: str = "same"):
        """
        Args:
            in_channels (int): channels of the edge's input.
            out_channels (int): the BiFPN width.
            direction (int): +1 when the target is one level coarser (3x3 stride-2 max-pool),
                -1 when it is finer (nearest upsampling), 0 for the same level.
            norm (callable): channels -> norm module or None.
            pool_padding (str): "same" (TensorFlow's SAME padding of the max-pool, as EfficientDet:
                the extra row / column, if any, at the bottom / right) or "symmetric" (1 on every
                side, as PyTorch ports of EfficientDet that train from scratch use).
        """
        super().__init__()
        if direction not in (-1, 0, 1):
            raise ValueError(f"BiFPN edges join adjacent levels; got direction {direction}.")
        self.direction = direction
        self.same_padding = pool_padding == "same"
        self.lateral = nn.Identity()
        if in_channels != out_channels:
            norm_module = norm(out_channels)
            self.lateral = Conv2d(in_channels, out_channels, 1, bias=norm_module is None,
                                  norm=norm_module)
            weight_init.c2_xavier_fill(self.lateral)

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        """
        Args:
            x (Tensor): (N, C_in, h, w) input.
            size (list[int]): (H, W) of the target level.

        Returns:
            Tensor: (N, C_out, H, W).
        """
        x = self.lateral(x)
        if self.direction > 0:
            if self.same_padding:
                # SAME: output ceil(h / 2); total padding (out - 1) * 2 + 3 - h, the larger half
                # at the bottom / right, padded with -inf (never the maximum).
                ph = max((x.shape[-2] + 1) // 2 * 2 + 1 - x.shape[-2], 0)
                pw = max((x.shape[-1] + 1) // 2 * 2 + 1 - x.shape[-1], 0)
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=float("-inf"))
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            else:
                x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
            h, w = x.shape[-2], x.shape[-1]
            if h != size[0] or w != size[1]:
                # exact size fix (bottom-ups that floor instead of ceil): crop or zero-pad at the
                # bottom / right, which keeps Detectron2's top-left-aligned grid.
                x = F.pad(x, [0, size[1] - w, 0, size[0] - h])
        elif self.direction < 0:
            x = F.interpolate(x, size=size, mode="nearest")
        return x


class BiFPNNode(nn.Module):
    """
    One BiFPN node: resample every input to the target level, fuse, activation, 3x3 conv
    (depthwise-separable by default), norm.
    """

    target_id: torch.jit.Final[int]

    def __init__(self, level: int, input_ids: Sequence[int], input_levels: Sequence[int],
                 input_channels: Sequence[int], width: int, fusion: str = "fast",
                 fusion_eps: float = 1e-4, separable_conv: bool = True, norm: Callable = _no_norm,
                 activation: str = "silu", pool_padding: str = "same"):
        """
        Args:
            level (int): target level index (0 = finest); the layer's input at this index gives
                the output size.
            input_ids, input_levels, input_channels (list[int]): per fused node, its id (see
                :func:`bifpn_graph`), level index and channels.
            width (int): output channels.
            norm (callable): channels -> norm module or None.
            fusion, fusion_eps, separable_conv, activation, pool_padding: as in :class:`BiFPN`.
        """
        super().__init__()
        self.target_id = level
        self.input_ids: List[int] = [int(i) for i in input_ids]
        self.edges = nn.ModuleList(
            Resample(c, width, level - lv, norm, pool_padding)
            for lv, c in zip(input_levels, input_channels)
        )
        n = len(self.input_ids)
        self.fusion = {"fast": lambda: FastNormalizedFusion(n, fusion_eps),
                       "softmax": lambda: SoftmaxFusion(n), "sum": SumFusion}[fusion]()
        self.activation = ACTIVATIONS[activation]()
        # depthwise 3x3 + pointwise 1x1, or a regular 3x3 conv; then the norm
        norm_module, k = norm(width), 1 if separable_conv else 3
        convs = [Conv2d(width, width, 3, padding=1, groups=width, bias=False)] if k == 1 else []
        convs.append(Conv2d(width, width, k, padding=k // 2, bias=norm_module is None,
                            norm=norm_module))
        for m in convs:
            weight_init.c2_xavier_fill(m)
        self.conv = nn.Sequential(*convs) if separable_conv else convs[0]

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            feats (list[Tensor]): all nodes computed so far in this layer (inputs first).

        Returns:
            Tensor: this node's output, (N, width, H, W) with the target level's size.
        """
        target = feats[self.target_id]
        size = [target.shape[-2], target.shape[-1]]
        xs: List[torch.Tensor] = []
        for i, edge in enumerate(self.edges):
            xs.append(edge(feats[self.input_ids[i]], size))
        return self.conv(self.activation(self.fusion(xs)))


class BiFPNLayer(nn.Module):
    """One BiFPN layer: the nodes of :func:`bifpn_graph` evaluated in order."""

    def __init__(self, in_channels: Sequence[int], width: int, **node_kwargs):
        """
        Args:
            in_channels (list[int]): channels of the layer's inputs, finest level first.
            width (int): output channels.
            node_kwargs: the other arguments of :class:`BiFPNNode`.
        """
        super().__init__()
        num_levels = len(in_channels)
        self.graph = bifpn_graph(num_levels)
        levels = list(range(num_levels)) + [lv for lv, _ in self.graph]
        channels = list(in_channels) + [width] * len(self.graph)
        self.nodes = nn.ModuleList(
            BiFPNNode(level, ids, [levels[i] for i in ids], [channels[i] for i in ids], width,
                      **node_kwargs)
            for level, ids in self.graph
        )
        self.output_ids: List[int] = bifpn_output_ids(self.graph, num_levels)

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        """
        Args:
            inputs (list[Tensor]): one tensor per level, finest first.

        Returns:
            list[Tensor]: the layer's outputs, one per level, finest first.
        """
        feats = [x for x in inputs]
        for node in self.nodes:
            feats.append(node(feats))
        return [feats[i] for i in self.output_ids]


class ExtraLevel(nn.Module):
    """
    A level above the bottom-up's top, ``maxpool(norm(conv1x1(x)))`` (conv + norm only where the
    channels differ from the width), as EfficientDet's P6 from C5 and P7 from P6. Output:
    (N, width, ceil(h / 2), ceil(w / 2)).
    """

    def __init__(self, in_channels: int, width: int, norm: Callable, pool_padding: str = "same"):
        super().__init__()
        self.resample = Resample(in_channels, width, 1, norm, pool_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x, [(x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2])


class BiFPNNeck(nn.Module):
    """The BiFPN without the bottom-up: extra levels, then ``repeats`` BiFPN layers."""

    def __init__(self, in_channels: Sequence[int], num_levels: int, width: int, repeats: int,
                 norm: Callable = _no_norm, pool_padding: str = "same", **node_kwargs):
        """
        Args:
            in_channels (list[int]): channels of the bottom-up inputs, finest first.
            num_levels (int): levels of the pyramid (>= len(in_channels); the extra ones are made
                from the top input).
            width, repeats: as in :class:`BiFPN`.
            norm (callable): channels -> norm module or None.
            pool_padding, node_kwargs: the other arguments of :class:`BiFPNNode`.
        """
        super().__init__()
        channels = list(in_channels) + [width] * (num_levels - len(in_channels))
        self.extra = nn.ModuleList(
            ExtraLevel(channels[lv - 1], width, norm, pool_padding)
            for lv in range(len(in_channels), num_levels)
        )
        self.layers = nn.ModuleList(
            BiFPNLayer(channels if r == 0 else [width] * num_levels, width, norm=norm,
                       pool_padding=pool_padding, **node_kwargs)
            for r in range(repeats)
        )

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        """
        Args:
            inputs (list[Tensor]): bottom-up features, finest first.

        Returns:
            list[Tensor]: one (N, width, H_l, W_l) tensor per level, finest first.
        """
        feats = [x for x in inputs]
        for extra in self.extra:
            feats.append(extra(feats[-1]))
        for layer in self.layers:
            feats = layer(feats)
        return feats


class BiFPN(Backbone):
    """
    A bottom-up backbone followed by a BiFPN. Outputs ``p<l>`` for ``l = min_level .. top_level``,
    each with ``width`` channels and stride ``2**l``.
    """

    #: Valid values of the arguments (and of the MODEL.BIFPN keys).
    PARAMS = {
        "in_features": StrList(),
        "top_level": Int(low=1),
        "width": Int(low=1),
        "repeats": Int(low=1),
        "fusion": OneOf("fast", "softmax", "sum"),
        "fusion_eps": Float(low=0.0, low_open=True),
        "separable_conv": Bool(),
        "norm": OneOf("BN", "SyncBN", "GN", ""),
        "bn_momentum": Float(0.0, 1.0),
        "bn_eps": Float(low=0.0, low_open=True),
        "gn_num_groups": Int(low=1),
        "activation": OneOf(*ACTIVATIONS),
        "pool_padding": OneOf(*POOL_PADDINGS),
        "size_divisibility": Int(low=0),
    }

    def __init__(self, bottom_up: Backbone, in_features: Sequence[str], top_level: int,
                 width: int = 64, repeats: int = 3, fusion: str = "fast",
                 fusion_eps: float = 1e-4, separable_conv: bool = True, norm: str = "BN",
                 bn_momentum: float = 0.01, bn_eps: float = 1e-3, gn_num_groups: int = 32,
                 activation: str = "silu", pool_padding: str = "same",
                 size_divisibility: int = 0, log_period: int = 0):
        """
        Args:
            bottom_up (Backbone): produces the features named in ``in_features``.
            in_features (list[str]): bottom-up features for the lowest levels, finest first, with
                strides doubling from one to the next.
            top_level (int): the coarsest level (7 for P3-P7); levels above the bottom-up's top
                input are made from it.
            width (int): channels of every BiFPN node.
            repeats (int): number of BiFPN layers.
            fusion (str): "fast" (:class:`FastNormalizedFusion`), "softmax" or "sum".
            fusion_eps (float): eps of the fast normalised fusion, > 0.
            separable_conv (bool): depthwise-separable (True) or regular 3x3 convs in the nodes.
            norm (str): "BN", "SyncBN", "GN" or "".
            bn_momentum (float): BN / SyncBN momentum, PyTorch convention.
            bn_eps (float): BN / SyncBN eps.
            gn_num_groups (int): GroupNorm groups (must divide ``width``).
            activation (str): "silu" (swish), "relu", "relu6" (EfficientDet-Lite) or "" (none),
                applied to the fused features.
            pool_padding (str): "same" (EfficientDet's TF padding) or "symmetric"; see
                :class:`Resample`.
            size_divisibility (int): input padding; 0 means the top level's stride ``2**top_level``
                so that every level is exactly half the one below.
            log_period (int): in training, log the fusion weights (:meth:`fusion_weights`) to the
                EventStorage every this many iterations; 0: never.
        """
        super().__init__()
        if not isinstance(bottom_up, Backbone):
            raise TypeError(
                f"BiFPN needs a detectron2 Backbone as bottom-up; got {type(bottom_up)}."
            )
        args = locals()
        check_params(self.PARAMS, **{a: args[a] for a in self.PARAMS})
        if norm == "GN" and width % gn_num_groups != 0:
            raise ValueError(
                f"gn_num_groups = {gn_num_groups!r} is invalid: it must divide the width ({width})."
            )
        in_features = list(in_features)
        shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if not in_features or missing:
            raise ValueError(
                f"in_features = {in_features} is invalid: the bottom-up produces only "
                f"{sorted(shapes)} (missing {missing}); list a non-empty subset of its outputs, "
                "finest first (for a ResNet, also add them to MODEL.RESNETS.OUT_FEATURES)."
            )
        strides = [shapes[f].stride for f in in_features]
        if any(s <= 0 or s & (s - 1) for s in strides) or any(
            b != 2 * a for a, b in zip(strides, strides[1:])
        ):
            raise ValueError(
                f"in_features = {in_features} is invalid: their strides {strides} must be "
                "contiguous levels (each stride a power of 2 and twice the previous, finest first)."
            )
        min_level, in_top_level = int(math.log2(strides[0])), int(math.log2(strides[-1]))
        if top_level < in_top_level:
            raise ValueError(
                f"top_level = {top_level} is invalid: it is below the level of the last input "
                f"feature ({in_features[-1]} = P{in_top_level}); use at least {in_top_level} or "
                "drop input features."
            )
        if top_level <= min_level:
            raise ValueError(
                f"top_level = {top_level} is invalid: a BiFPN needs at least 2 levels, and with "
                f"the input features {in_features} it gives only P{min_level}."
            )
        norm_factory = {
            "BN": lambda c: nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum),
            "SyncBN": lambda c: nn.SyncBatchNorm(c, eps=bn_eps, momentum=bn_momentum),
            "GN": lambda c: nn.GroupNorm(gn_num_groups, c),
            "": _no_norm,
        }[norm]
        self.bottom_up = bottom_up
        self.in_features: List[str] = in_features
        self.min_level = min_level
        self.top_level = top_level
        self.neck = BiFPNNeck(
            [shapes[f].channels for f in in_features], top_level - min_level + 1, width, repeats,
            fusion=fusion, fusion_eps=fusion_eps, separable_conv=separable_conv,
            norm=norm_factory, activation=activation, pool_padding=pool_padding,
        )
        self._out_features = [f"p{lv}" for lv in range(min_level, top_level + 1)]
        self._out_feature_strides = {f"p{lv}": 2**lv for lv in range(min_level, top_level + 1)}
        self._out_feature_channels = {f: width for f in self._out_features}
        self._size_divisibility = size_divisibility if size_divisibility > 0 else 2**top_level
        self.log_period = checked_log_period(log_period)

    @property
    def size_divisibility(self) -> int:
        """Inputs are padded to a multiple of this (the top level's stride by default)."""
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        """Detectron2 padding constraints: ``size_divisibility`` as above, no square padding."""
        return {"size_divisibility": self._size_divisibility, "square_size": 0}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x (Tensor): (N, C, H, W) images.

        Returns:
            dict[str, Tensor]: ``p<l>`` -> (N, width, ~H / 2**l, ~W / 2**l), finest first.
        """
        bottom_up_features = self.bottom_up(x)
        outputs = self.neck([bottom_up_features[f] for f in self.in_features])
        if self.training and not torch.jit.is_scripting():
            self._log_fusion_weights()
        return {name: out for name, out in zip(self._out_features, outputs)}

    @torch.jit.unused
    def _log_fusion_weights(self):
        storage = storage_to_log(self.log_period)
        if storage is not None:
            storage.put_scalars(smoothing_hint=False, **self.fusion_weights())

    @torch.no_grad()
    def fusion_weights(self) -> Dict[str, float]:
        """
        Returns:
            dict[str, float]: ``bifpn/layer<r>/node<j>_p<l>/w<i>`` -> the normalised weight of
            input ``i`` of node ``j`` (output level ``p<l>``) of BiFPN layer ``r``; empty for
            "sum" fusion.
        """
        out = {}
        for r, layer in enumerate(self.neck.layers):
            for j, node in enumerate(layer.nodes):
                if isinstance(node.fusion, _WeightedFusion):
                    name = f"bifpn/layer{r}/node{j}_p{node.target_id + self.min_level}"
                    for i, w in enumerate(node.fusion.normalized_weights().tolist()):
                        out[f"{name}/w{i}"] = w
        return out


@BACKBONE_REGISTRY.register()
def build_bifpn_backbone(cfg, input_shape: ShapeSpec):
    """
    Build the bottom-up named by ``MODEL.BIFPN.BOTTOM_UP`` and a BiFPN on top of it, from the
    ``MODEL.BIFPN`` keys. Serves RetinaNet (P3-P7), Faster R-CNN (P2-P6) and EfficientDet configs
    alike.

    Args:
        cfg (CfgNode): a config with LibraGHM's keys.
        input_shape (ShapeSpec): the images' shape spec.

    Returns:
        BiFPN: the backbone.
    """
    c = cfg.MODEL.BIFPN
    args = {a: c[a.upper()] for a in BiFPN.PARAMS}
    keys = {a: f"MODEL.BIFPN.{a.upper()}" for a in BiFPN.PARAMS}
    # Check the cheap keys before building the bottom-up.
    check_params(BiFPN.PARAMS, keys, **args)
    valid = sorted(k for k, _ in BACKBONE_REGISTRY if k != "build_bifpn_backbone")
    if c.BOTTOM_UP not in valid:
        raise ValueError(
            f"MODEL.BIFPN.BOTTOM_UP = {c.BOTTOM_UP!r} is invalid: expected a bottom-up builder "
            f"of BACKBONE_REGISTRY, one of {valid}."
        )
    bottom_up = BACKBONE_REGISTRY.get(c.BOTTOM_UP)(cfg, input_shape)
    with config_keys("MODEL.BIFPN", keys):
        bifpn = BiFPN(bottom_up, **args, log_period=checked_log_period(cfg.LIBRAGHM.LOG_PERIOD, "LIBRAGHM.LOG_PERIOD"))
    check_head_inputs(cfg, bifpn.output_shape(), "MODEL.BIFPN.IN_FEATURES and TOP_LEVEL")
    return bifpn
