"""BiFPN (EfficientDet, Tan, Pang and Le, CVPR 2020) as a Detectron2 backbone wrapper.

:class:`BiFPN` wraps any Detectron2 bottom-up :class:`Backbone` (a ResNet by default) and builds a
bidirectional feature pyramid over a contiguous range of levels ``P_min .. P_max``:

* Levels the bottom-up provides come from ``MODEL.BIFPN.IN_FEATURES`` (e.g. res3..res5 = P3..P5);
  levels above them are made from the top input as in EfficientDet:
  ``P6 = maxpool(norm(conv1x1(C5)))`` (the 1x1 conv + norm only where the channels differ from the
  width) and ``P7 = maxpool(P6)``.
* One BiFPN layer is a top-down pass followed by a bottom-up pass (:func:`bifpn_graph` gives the
  graph as data). Every node fuses its inputs (fast normalised fusion by default:
  ``out = sum_i relu(w_i) x_i / (eps + sum_j relu(w_j))``, ``eps = 1e-4``, ``w_i = 1`` at init), then
  applies swish, a depthwise-separable 3x3 conv and BatchNorm (PyTorch momentum 0.01, eps 1e-3).
  Each edge resamples its input to the exact size of the target level (nearest upsampling with
  ``interpolate(size=...)``, 3x3 stride-2 max-pool downsampling followed by a crop / pad when the
  pooled size is off by one), so every input size works, not only multiples of the top stride.
  The max-pool pads as TensorFlow's "SAME" (EfficientDet's): on an even-sized input the window
  starts at the first row and the extra padding is at the bottom / right. ``POOL_PADDING:
  symmetric`` pads 1 on every side instead (PyTorch ports that train from scratch), which shifts
  every pooling window by one pixel on even sizes: a different function, not only a different
  initialisation.
  As in EfficientDet, an edge whose input has other than ``width`` channels (only the bottom-up
  inputs of the first layer) gets its own 1x1 conv + norm.
* The layer is repeated ``REPEATS`` times at width ``WIDTH`` (or the EfficientDet ``PRESET`` D0..D7).

Deviations from the reference implementation that do not change the function the network can
compute: a conv followed by a norm has no bias (the norm removes it), and convs are initialised
with Detectron2's ``c2_xavier_fill`` like Detectron2's FPN (a different starting point).

The forward pass uses plain lists and ``ModuleList`` iteration only, so the whole backbone can be
compiled with ``torch.jit.script`` and exported with ``torch.onnx.export``.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone

from ..events import checked_log_period, storage_to_log
from ..validation import Bool, Float, Int, OneOf, StrList, check_head_inputs, check_params, config_keys

__all__ = [
    "BIFPN_PRESETS",
    "BiFPN",
    "BiFPNLayer",
    "BiFPNNeck",
    "BiFPNNode",
    "FastNormalizedFusion",
    "Resample",
    "SoftmaxFusion",
    "SumFusion",
    "bifpn_graph",
    "bifpn_output_ids",
    "build_bifpn_backbone",
]

# EfficientDet D0..D7: (BiFPN width, BiFPN repeats). Table 1 of the paper.
BIFPN_PRESETS: Dict[str, Tuple[int, int]] = {
    "D0": (64, 3),
    "D1": (88, 4),
    "D2": (112, 5),
    "D3": (160, 6),
    "D4": (224, 7),
    "D5": (288, 7),
    "D6": (384, 8),
    "D7": (384, 8),
}
FUSIONS = ("fast", "softmax", "sum")
NORMS = ("BN", "SyncBN", "GN", "")
ACTIVATIONS = ("silu", "relu", "")
POOL_PADDINGS = ("same", "symmetric")


# -------------------------------------------------------------------------------------------------
# The graph, as data
# -------------------------------------------------------------------------------------------------
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
        prev = num_levels + len(nodes) - 1
        top_down_id[level] = prev
    for level in range(1, num_levels):
        inputs = [level] + ([top_down_id[level]] if level < top else []) + [prev]
        nodes.append((level, inputs))
        prev = num_levels + len(nodes) - 1
    return nodes


def bifpn_output_ids(graph: Sequence[Tuple[int, Sequence[int]]], num_levels: int) -> List[int]:
    """
    Args:
        graph: nodes as returned by :func:`bifpn_graph`.
        num_levels (int): number of levels.

    Returns:
        list[int]: per level (finest first), the id of the last node computing it: the layer's output.
    """
    out = list(range(num_levels))
    for k, (level, _) in enumerate(graph):
        out[level] = num_levels + k
    return out


# -------------------------------------------------------------------------------------------------
# Building blocks
# -------------------------------------------------------------------------------------------------
class _WeightedFusion(nn.Module):
    """A sum of the inputs weighted by :meth:`normalized_weights` of one learnt weight per input."""

    def __init__(self, num_inputs: int):
        """
        Args:
            num_inputs (int): number of fused tensors.
        """
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))

    def normalized_weights(self) -> torch.Tensor:
        """The effective weight of every input (defined by subclasses)."""
        raise NotImplementedError

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
    EfficientDet's fast normalised fusion: ``sum_i relu(w_i) x_i / (eps + sum_j relu(w_j))``.
    """

    eps: torch.jit.Final[float]

    def __init__(self, num_inputs: int, eps: float = 1e-4):
        """
        Args:
            num_inputs (int): number of fused tensors.
            eps (float): added to the weights' sum (1e-4 in the paper).
        """
        super().__init__(num_inputs)
        self.eps = eps

    def normalized_weights(self) -> torch.Tensor:
        """The effective weights ``relu(w_i) / (eps + sum_j relu(w_j))``."""
        w = F.relu(self.weight)
        return w / (w.sum() + self.eps)


class SoftmaxFusion(_WeightedFusion):
    """Softmax-based fusion: ``sum_i softmax(w)_i x_i`` (EfficientDet's slower variant)."""

    def normalized_weights(self) -> torch.Tensor:
        """The effective weights ``softmax(w)``."""
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
        if in_channels != out_channels:
            norm_module = norm(out_channels)
            self.lateral = Conv2d(
                in_channels, out_channels, 1, bias=norm_module is None, norm=norm_module
            )
            weight_init.c2_xavier_fill(self.lateral)
        else:
            self.lateral = nn.Identity()

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

    def __init__(
        self,
        level: int,
        input_ids: Sequence[int],
        input_levels: Sequence[int],
        input_channels: Sequence[int],
        width: int,
        fusion: str,
        fusion_eps: float,
        separable_conv: bool,
        norm: Callable,
        activation: str,
        pool_padding: str = "same",
    ):
        """
        Args:
            level (int): target level index (0 = finest); the layer's input at this index gives
                the output size.
            input_ids (list[int]): ids of the fused nodes (see :func:`bifpn_graph`).
            input_levels (list[int]): their level indices.
            input_channels (list[int]): their channels.
            width (int): output channels.
            fusion (str): "fast", "softmax" or "sum".
            fusion_eps (float): eps of the fast normalised fusion.
            separable_conv (bool): depthwise-separable (True) or regular 3x3 conv.
            norm (callable): channels -> norm module or None.
            activation (str): "silu", "relu" or "" (none), applied to the fused features.
            pool_padding (str): see :class:`Resample`.
        """
        super().__init__()
        self.target_id = level
        self.input_ids: List[int] = [int(i) for i in input_ids]
        self.edges = nn.ModuleList(
            Resample(c, width, level - lv, norm, pool_padding)
            for lv, c in zip(input_levels, input_channels)
        )
        n = len(self.input_ids)
        if fusion == "fast":
            self.fusion = FastNormalizedFusion(n, fusion_eps)
        elif fusion == "softmax":
            self.fusion = SoftmaxFusion(n)
        else:
            self.fusion = SumFusion()
        self.activation = _make_activation(activation)
        norm_module = norm(width)
        if separable_conv:
            depthwise = Conv2d(width, width, 3, padding=1, groups=width, bias=False)
            pointwise = Conv2d(width, width, 1, bias=norm_module is None, norm=norm_module)
            self.conv = nn.Sequential(depthwise, pointwise)
            for m in (depthwise, pointwise):
                weight_init.c2_xavier_fill(m)
        else:
            self.conv = Conv2d(
                width, width, 3, padding=1, bias=norm_module is None, norm=norm_module
            )
            weight_init.c2_xavier_fill(self.conv)

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
            node_kwargs: fusion, fusion_eps, separable_conv, norm, activation for :class:`BiFPNNode`.
        """
        super().__init__()
        num_levels = len(in_channels)
        graph = bifpn_graph(num_levels)
        self.graph = graph
        node_levels = list(range(num_levels)) + [lv for lv, _ in graph]
        node_channels = list(in_channels) + [width] * len(graph)
        self.nodes = nn.ModuleList(
            BiFPNNode(
                level,
                ids,
                [node_levels[i] for i in ids],
                [node_channels[i] for i in ids],
                width,
                **node_kwargs,
            )
            for level, ids in graph
        )
        self.output_ids: List[int] = bifpn_output_ids(graph, num_levels)

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
    A level above the bottom-up's top: ``maxpool(norm(conv1x1(x)))`` (conv + norm only where the
    channels differ from the width), as EfficientDet's P6 from C5 and P7 from P6.
    """

    def __init__(self, in_channels: int, width: int, norm: Callable, pool_padding: str = "same"):
        """
        Args:
            in_channels (int): channels of the level below.
            width (int): the BiFPN width.
            norm (callable): channels -> norm module or None.
            pool_padding (str): see :class:`Resample`.
        """
        super().__init__()
        self.resample = Resample(in_channels, width, 1, norm, pool_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor): (N, C, h, w) level below.

        Returns:
            Tensor: (N, width, ceil(h / 2), ceil(w / 2)).
        """
        size = [(x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2]
        return self.resample(x, size)


class BiFPNNeck(nn.Module):
    """
    The BiFPN without the bottom-up: extra levels, then ``repeats`` BiFPN layers.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_levels: int,
        width: int,
        repeats: int,
        fusion: str = "fast",
        fusion_eps: float = 1e-4,
        separable_conv: bool = True,
        norm: Callable = lambda c: None,
        activation: str = "silu",
        pool_padding: str = "same",
    ):
        """
        Args:
            in_channels (list[int]): channels of the bottom-up inputs, finest first.
            num_levels (int): levels of the pyramid (>= len(in_channels); the extra ones are made
                from the top input).
            width (int): BiFPN channels.
            repeats (int): number of BiFPN layers.
            fusion, fusion_eps, separable_conv, norm, activation, pool_padding: see
                :class:`BiFPNNode`.
        """
        super().__init__()
        extra = []
        c = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            extra.append(ExtraLevel(c, width, norm, pool_padding))
            c = width
        self.extra = nn.ModuleList(extra)
        channels = list(in_channels) + [width] * len(extra)
        layers = []
        for _ in range(repeats):
            layers.append(
                BiFPNLayer(
                    channels,
                    width,
                    fusion=fusion,
                    fusion_eps=fusion_eps,
                    separable_conv=separable_conv,
                    norm=norm,
                    activation=activation,
                    pool_padding=pool_padding,
                )
            )
            channels = [width] * num_levels
        self.layers = nn.ModuleList(layers)

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


def _make_activation(name: str) -> nn.Module:
    return {"silu": nn.SiLU, "relu": nn.ReLU, "": nn.Identity}[name]()


def _make_norm_factory(
    norm: str, bn_momentum: float, bn_eps: float, gn_groups: int
) -> Callable[[int], Optional[nn.Module]]:
    if norm == "BN":
        return lambda c: nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum)
    if norm == "SyncBN":
        return lambda c: nn.SyncBatchNorm(c, eps=bn_eps, momentum=bn_momentum)
    if norm == "GN":
        return lambda c: nn.GroupNorm(gn_groups, c)
    return lambda c: None


def _is_log2_contiguous(strides: Sequence[int]) -> bool:
    return all(s > 0 and (s & (s - 1)) == 0 for s in strides) and all(
        b == 2 * a for a, b in zip(strides[:-1], strides[1:])
    )


# -------------------------------------------------------------------------------------------------
# The Detectron2 backbone
# -------------------------------------------------------------------------------------------------
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
        "fusion": OneOf(*FUSIONS),
        "fusion_eps": Float(low=0.0, low_open=True),
        "separable_conv": Bool(),
        "norm": OneOf(*NORMS),
        "bn_momentum": Float(0.0, 1.0),
        "bn_eps": Float(low=0.0, low_open=True),
        "gn_num_groups": Int(low=1),
        "activation": OneOf(*ACTIVATIONS),
        "pool_padding": OneOf(*POOL_PADDINGS),
        "size_divisibility": Int(low=0),
    }

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: Sequence[str],
        top_level: int,
        width: int = 64,
        repeats: int = 3,
        fusion: str = "fast",
        fusion_eps: float = 1e-4,
        separable_conv: bool = True,
        norm: str = "BN",
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-3,
        gn_num_groups: int = 32,
        activation: str = "silu",
        pool_padding: str = "same",
        size_divisibility: int = 0,
        log_period: int = 0,
    ):
        """
        Args:
            bottom_up (Backbone): produces the features named in ``in_features``.
            in_features (list[str]): bottom-up features for the lowest levels, finest first, with
                strides doubling from one to the next.
            top_level (int): the coarsest level (7 for P3-P7); levels above the bottom-up's top
                input are made from it.
            width (int): channels of every BiFPN node.
            repeats (int): number of BiFPN layers.
            fusion (str): "fast" (fast normalised), "softmax" or "sum".
            fusion_eps (float): eps of the fast normalised fusion, > 0.
            separable_conv (bool): depthwise-separable (True) or regular 3x3 convs in the nodes.
            norm (str): "BN", "SyncBN", "GN" or "".
            bn_momentum (float): BN / SyncBN momentum, PyTorch convention.
            bn_eps (float): BN / SyncBN eps.
            gn_num_groups (int): GroupNorm groups (must divide ``width``).
            activation (str): "silu", "relu" or "".
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
        check_params(
            self.PARAMS, in_features=in_features, top_level=top_level, width=width,
            repeats=repeats, fusion=fusion, fusion_eps=fusion_eps, separable_conv=separable_conv,
            norm=norm, bn_momentum=bn_momentum, bn_eps=bn_eps, gn_num_groups=gn_num_groups,
            activation=activation, pool_padding=pool_padding, size_divisibility=size_divisibility,
        )
        if norm == "GN" and width % gn_num_groups != 0:
            raise ValueError(
                f"gn_num_groups = {gn_num_groups!r} is invalid: it must divide the width ({width})."
            )
        in_features = list(in_features)
        shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if not in_features or missing:
            raise ValueError(
                f"in_features = {in_features} is invalid: the bottom-up produces only {sorted(shapes)} "
                f"(missing {missing}); list a non-empty subset of its outputs, finest first (for a "
                "ResNet, also add them to MODEL.RESNETS.OUT_FEATURES)."
            )
        strides = [shapes[f].stride for f in in_features]
        if not _is_log2_contiguous(strides):
            raise ValueError(
                f"in_features = {in_features} is invalid: their strides {strides} must be "
                "contiguous levels (each stride a power of 2 and twice the previous, finest first)."
            )
        min_level = int(math.log2(strides[0]))
        in_top_level = int(math.log2(strides[-1]))
        if top_level < in_top_level:
            raise ValueError(
                f"top_level = {top_level} is invalid: it is below the level of the last input "
                f"feature ({in_features[-1]} = P{in_top_level}); use at least {in_top_level} or "
                "drop input features."
            )
        num_levels = top_level - min_level + 1
        if num_levels < 2:
            raise ValueError(
                f"top_level = {top_level} is invalid: a BiFPN needs at least 2 levels, and with "
                f"the input features {in_features} it gives only P{min_level}."
            )
        self.bottom_up = bottom_up
        self.in_features: List[str] = in_features
        self.min_level = min_level
        self.top_level = top_level
        self.neck = BiFPNNeck(
            [shapes[f].channels for f in in_features],
            num_levels,
            width,
            repeats,
            fusion=fusion,
            fusion_eps=fusion_eps,
            separable_conv=separable_conv,
            norm=_make_norm_factory(norm, bn_momentum, bn_eps, gn_num_groups),
            activation=activation,
            pool_padding=pool_padding,
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
        inputs = [bottom_up_features[f] for f in self.in_features]
        outputs = self.neck(inputs)
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
                if not hasattr(node.fusion, "normalized_weights"):
                    continue
                name = f"bifpn/layer{r}/node{j}_p{node.target_id + self.min_level}"
                for i, w in enumerate(node.fusion.normalized_weights().tolist()):
                    out[f"{name}/w{i}"] = w
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """
        Returns:
            dict[str, ShapeSpec]: channels and stride of every output.
        """
        return {
            f: ShapeSpec(
                channels=self._out_feature_channels[f], stride=self._out_feature_strides[f]
            )
            for f in self._out_features
        }


def resolve_width_repeats(preset: str, width: int, repeats: int) -> Tuple[int, int]:
    """
    Args:
        preset (str): "" or an EfficientDet size "D0".."D7" (MODEL.BIFPN.PRESET).
        width, repeats (int): MODEL.BIFPN.WIDTH / REPEATS, used when ``preset`` is "".

    Returns:
        tuple[int, int]: (width, repeats).
    """
    if preset == "":
        return width, repeats
    if preset not in BIFPN_PRESETS:
        raise ValueError(
            f"MODEL.BIFPN.PRESET = {preset!r} is invalid: expected '' (use WIDTH / REPEATS) or one "
            f"of {list(BIFPN_PRESETS)}."
        )
    return BIFPN_PRESETS[preset]


@BACKBONE_REGISTRY.register()
def build_bifpn_backbone(cfg, input_shape: ShapeSpec):
    """
    Build the bottom-up named by ``MODEL.BIFPN.BOTTOM_UP`` and a BiFPN on top of it, from the
    ``MODEL.BIFPN`` keys. Serves RetinaNet (P3-P7) and Faster R-CNN (P2-P6) configs alike.

    Args:
        cfg (CfgNode): a config with LibraGHM's keys.
        input_shape (ShapeSpec): the images' shape spec.

    Returns:
        BiFPN: the backbone.
    """
    c = cfg.MODEL.BIFPN
    args = {a: c[a.upper()] for a in BiFPN.PARAMS}
    args["width"], args["repeats"] = resolve_width_repeats(c.PRESET, c.WIDTH, c.REPEATS)
    keys = {a: f"MODEL.BIFPN.{a.upper()}" for a in BiFPN.PARAMS}
    if c.PRESET:
        keys.update(width=f"MODEL.BIFPN.PRESET {c.PRESET}'s width",
                    repeats=f"MODEL.BIFPN.PRESET {c.PRESET}'s repeats")
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
        bifpn = BiFPN(bottom_up, **args, log_period=checked_log_period(cfg.LIBRAGHM.LOG_PERIOD))
    check_head_inputs(cfg, bifpn.output_shape(), "MODEL.BIFPN.IN_FEATURES and TOP_LEVEL")
    return bifpn
