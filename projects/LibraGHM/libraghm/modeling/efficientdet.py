"""EfficientDet (Tan, Pang and Le, CVPR 2020) as a Detectron2 meta-architecture.

    MODEL.META_ARCHITECTURE: "EfficientDet"
    MODEL.EFFICIENTDET.PRESET: "D0"          # or "D1".."D7", "Lite0".."Lite4", "" (keys as written)

The detector is :class:`~libraghm.modeling.retinanet.LibraGHMRetinaNet` (Detectron2's RetinaNet:
anchor labelling, training, inference; LibraGHM's pluggable losses, so "focal", "ghm_c" and every
box loss of the registries work) with

* the backbone ``build_bifpn_backbone`` over ``build_efficientnet_backbone`` (EfficientNet-B or
  -Lite, BiFPN on P3-P7; see docs/bifpn.md and docs/efficientnet.md), and
* :class:`~libraghm.modeling.efficientdet_head.EfficientDetHead` instead of ``RetinaNetHead``.

The preset (libraghm/modeling/efficientdet_presets.py) sets the compound-scaled sizes, anchors,
losses and input size; the model refuses to build from a config whose preset was not applied.
"""
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from .efficientdet_head import EfficientDetHead
from .efficientdet_presets import check_efficientdet_preset
from .retinanet import LibraGHMRetinaNet

__all__ = ["EfficientDet"]


@META_ARCH_REGISTRY.register()
class EfficientDet(LibraGHMRetinaNet):
    """
    LibraGHMRetinaNet with EfficientDet's head (whatever the backbone; EfficientNet + BiFPN under a
    preset). Only the head differs; the losses are LibraGHMRetinaNet's.
    """

    # Training-only modules (they take Python objects such as Box2BoxTransform): left out when
    # the model is scripted for inference.
    __jit_ignored_attributes__ = ["cls_loss", "box_reg_loss"]

    @configurable
    def __init__(self, *, preset: str = "", **kwargs):
        """
        Args:
            preset (str): the name of the preset the config was set up with, or "" (recorded only).
            kwargs: arguments of :class:`LibraGHMRetinaNet`; ``head`` is an
                :class:`EfficientDetHead` when built from a config.
        """
        super().__init__(**kwargs)
        self.preset = preset

    @classmethod
    def from_config(cls, cfg):
        preset = check_efficientdet_preset(cfg)
        # Detectron2's RetinaNet.from_config builds the backbone, anchors and matcher; its
        # RetinaNetHead is replaced by EfficientDet's.
        ret = super().from_config(cfg)
        shapes = ret["backbone"].output_shape()
        feature_shapes = [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        num_anchors = ret["anchor_generator"].num_cell_anchors
        if len(set(num_anchors)) != 1:
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR gives {num_anchors} anchors per position at the levels; "
                "EfficientDet's head shares its predictors across levels and needs the same "
                "number at every level."
            )
        ret["head"] = EfficientDetHead(cfg, feature_shapes, num_anchors[0])
        ret["preset"] = preset
        return ret
