"""EfficientDet's class and box prediction networks (Tan, Pang and Le, CVPR 2020, Sec. 3.3 and 4.2).

Each of the two networks is ``D_box = D_class`` depthwise-separable 3x3 convs followed by a
depthwise-separable 3x3 predictor. The convs are shared by all pyramid levels; each conv is
followed by a batch norm that is *kept per level* (one BN module per level and conv: the statistics
of P3 and P7 differ, the filters are the same) and by the activation (swish for D0-D7, ReLU6 for
the Lite models). A separable conv is a depthwise 3x3 (no bias) and a pointwise 1x1 with bias.

Initialisation: the convs' depthwise and pointwise filters are normal with std ``1/sqrt(fan_in)``
(TensorFlow's default variance scaling, as the reference), the predictors' pointwise filters
normal with std 0.01 and their biases 0 (box net) and ``-log((1 - p) / p)`` with the prior
probability ``p`` = ``MODEL.RETINANET.PRIOR_PROB`` (0.01) for the class net, so that every anchor
starts at foreground probability ~p.

The forward pass only iterates over ``ModuleList``s, so the head can be scripted with
``torch.jit.script`` and exported to ONNX.
"""
import math
from typing import List, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec

from ..validation import Float, Int, OneOf, check_params, read_params

__all__ = ["SeparableConv2d", "PredictionNet", "EfficientDetHead"]

ACTIVATIONS = {"silu": nn.SiLU, "relu6": nn.ReLU6, "relu": nn.ReLU}
NORMS = {"BN": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm}


class SeparableConv2d(nn.Module):
    """A depthwise ``kernel_size`` x ``kernel_size`` conv (no bias), then a pointwise 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 bias: bool = True):
        """
        Args:
            in_channels, out_channels (int): channels.
            kernel_size (int): odd size of the depthwise filter ("same" padding, stride 1).
            bias (bool): the pointwise conv has a bias.
        """
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size,
                                   padding=kernel_size // 2, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _variance_scaling_(conv: nn.Conv2d) -> None:
    fan_in = conv.weight[0].numel()
    nn.init.normal_(conv.weight, std=1.0 / math.sqrt(fan_in))


class PredictionNet(nn.Module):
    """
    One prediction network (the class net or the box net): shared separable convs with a norm per
    level, then a shared separable predictor.
    """

    def __init__(self, channels: int, num_outputs: int, repeats: int, num_levels: int,
                 activation: str = "silu", norm: str = "BN", bn_momentum: float = 0.01,
                 bn_eps: float = 1e-3, bias_init: float = 0.0):
        """
        Args:
            channels (int): channels of every input level (the BiFPN width).
            num_outputs (int): predictor channels (anchors x classes, or anchors x 4).
            repeats (int): separable convs before the predictor.
            num_levels (int): pyramid levels (one norm per level and conv).
            activation (str): "silu", "relu6" or "relu".
            norm (str): "BN" or "SyncBN".
            bn_momentum, bn_eps (float): of the norms (PyTorch's momentum convention).
            bias_init (float): initial bias of the predictor.
        """
        super().__init__()
        self.convs = nn.ModuleList(SeparableConv2d(channels, channels) for _ in range(repeats))
        #: norms[level][i] follows convs[i] at that level
        self.norms = nn.ModuleList(
            nn.ModuleList(NORMS[norm](channels, eps=bn_eps, momentum=bn_momentum)
                          for _ in range(repeats))
            for _ in range(num_levels)
        )
        self.activation = ACTIVATIONS[activation]()
        self.predictor = SeparableConv2d(channels, num_outputs)
        for conv in self.convs:
            _variance_scaling_(conv.depthwise)
            _variance_scaling_(conv.pointwise)
            nn.init.zeros_(conv.pointwise.bias)
        _variance_scaling_(self.predictor.depthwise)
        nn.init.normal_(self.predictor.pointwise.weight, std=0.01)
        nn.init.constant_(self.predictor.pointwise.bias, bias_init)

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """
        Args:
            features (list[Tensor]): one (N, C, H_l, W_l) map per level, finest first.

        Returns:
            list[Tensor]: one (N, num_outputs, H_l, W_l) map per level.
        """
        outputs: List[torch.Tensor] = []
        for level, norms in enumerate(self.norms):
            x = features[level]
            for conv, norm in zip(self.convs, norms):
                x = self.activation(norm(conv(x)))
            outputs.append(self.predictor(x))
        return outputs


class EfficientDetHead(nn.Module):
    """
    EfficientDet's head: the class net and the box net, with the outputs of Detectron2's
    ``RetinaNetHead`` (so that :class:`detectron2.modeling.RetinaNet`'s training and inference use
    it unchanged).
    """

    #: Valid values of the arguments read from MODEL.EFFICIENTDET (MODEL.EFFICIENTDET.<ARG>).
    PARAMS = {
        "box_class_repeats": Int(low=1),
        "activation": OneOf(*ACTIVATIONS),
        "norm": OneOf(*NORMS),
        "bn_momentum": Float(0.0, 1.0),
        "bn_eps": Float(low=0.0, low_open=True),
    }

    @configurable
    def __init__(self, *, input_shape: Sequence[ShapeSpec], num_classes: int, num_anchors: int,
                 box_class_repeats: int = 3, activation: str = "silu", norm: str = "BN",
                 bn_momentum: float = 0.01, bn_eps: float = 1e-3, prior_prob: float = 0.01):
        """
        Args:
            input_shape (list[ShapeSpec]): the levels' shapes, finest first; all of one width.
            num_classes (int): object classes (no background).
            num_anchors (int): anchors per position (the same at every level).
            box_class_repeats (int): separable convs per network before its predictor (>= 1).
            activation (str): "silu" (swish, D0-D7), "relu6" (Lite) or "relu".
            norm (str): "BN" or "SyncBN", one module per level and conv.
            bn_momentum, bn_eps (float): of the norms.
            prior_prob (float): initial foreground probability of every class logit, in (0, 1).
        """
        super().__init__()
        check_params(self.PARAMS, box_class_repeats=box_class_repeats, activation=activation,
                     norm=norm, bn_momentum=bn_momentum, bn_eps=bn_eps)
        Float(0.0, 1.0, low_open=True, high_open=True).check(prior_prob, "prior_prob")
        widths = sorted({s.channels for s in input_shape})
        if len(widths) != 1:
            raise ValueError(
                f"The EfficientDet head shares its convs across levels, so every level needs the "
                f"same channels; got {[s.channels for s in input_shape]}."
            )
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        common = dict(channels=widths[0], repeats=box_class_repeats, num_levels=len(input_shape),
                      activation=activation, norm=norm, bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.class_net = PredictionNet(
            num_outputs=num_anchors * num_classes,
            bias_init=-math.log((1 - prior_prob) / prior_prob), **common)
        self.box_net = PredictionNet(num_outputs=num_anchors * 4, **common)

    @classmethod
    def from_config(cls, cfg, input_shape: Sequence[ShapeSpec], num_anchors: int):
        """
        Args:
            cfg (CfgNode): reads ``MODEL.EFFICIENTDET.{BOX_CLASS_REPEATS, ACTIVATION, NORM,
                BN_MOMENTUM, BN_EPS}``, ``MODEL.RETINANET.NUM_CLASSES`` and ``PRIOR_PROB``.
            input_shape (list[ShapeSpec]): the levels' shapes.
            num_anchors (int): anchors per position.
        """
        ret = read_params(cfg, "MODEL.EFFICIENTDET", cls.PARAMS)
        ret["prior_prob"] = Float(0.0, 1.0, low_open=True, high_open=True).check(
            cfg.MODEL.RETINANET.PRIOR_PROB, "MODEL.RETINANET.PRIOR_PROB")
        ret.update(input_shape=list(input_shape), num_classes=cfg.MODEL.RETINANET.NUM_CLASSES,
                   num_anchors=num_anchors)
        return ret

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            features (list[Tensor]): one (N, C, H_l, W_l) map per level, finest first.

        Returns:
            (list[Tensor], list[Tensor]): per level, the class logits (N, A x K, H_l, W_l) and the
            box deltas (N, A x 4, H_l, W_l), as Detectron2's ``RetinaNetHead``.
        """
        return self.class_net(features), self.box_net(features)
