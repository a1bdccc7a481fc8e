"""A narrow ResNet bottom-up and its FPN wrappers, for configs that train from scratch on a CPU.

Detectron2's ``build_resnet_backbone`` fixes the width of ResNet-18/34 at 64 channels in res2.
These builders assemble Detectron2's own ``BasicStem``, ``BasicBlock`` and ``ResNet`` with the
stage widths of ``MODEL.SMALL_RESNET.WIDTHS`` and the block counts of
``MODEL.SMALL_RESNET.BLOCKS``; everything else (norm, freeze_at, out_features) comes from
``MODEL.RESNETS``.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

from ..validation import IntList, read_params

__all__ = [
    "build_small_resnet_backbone",
    "build_small_resnet_fpn_backbone",
    "build_small_resnet_retinanet_fpn_backbone",
]

#: Valid values of MODEL.SMALL_RESNET: stage widths and block counts of res2..res5.
PARAMS = {"widths": IntList(4), "blocks": IntList(4)}


@BACKBONE_REGISTRY.register()
def build_small_resnet_backbone(cfg, input_shape: ShapeSpec):
    """
    Build a ResNet of BasicBlocks with configurable stage widths.

    Returns:
        ResNet: a Detectron2 ResNet with outputs ``MODEL.RESNETS.OUT_FEATURES``.
    """
    p = read_params(cfg, "MODEL.SMALL_RESNET", PARAMS)
    widths, blocks = p["widths"], p["blocks"]
    norm = cfg.MODEL.RESNETS.NORM
    stem = BasicStem(in_channels=input_shape.channels, out_channels=widths[0], norm=norm)
    out_features = cfg.MODEL.RESNETS.OUT_FEATURES
    stages, in_channels = [], widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks)):
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                n,
                stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                in_channels=in_channels,
                out_channels=w,
                norm=norm,
            )
        )
        in_channels = w
        if f"res{i + 2}" == max(out_features):
            break
    return ResNet(stem, stages, out_features=out_features, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_small_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    A small ResNet + FPN with P2-P6 (as ``build_resnet_fpn_backbone``), for Faster R-CNN.

    Returns:
        FPN: the pyramid backbone.
    """
    return FPN(
        bottom_up=build_small_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_small_resnet_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    A small ResNet + FPN with P3-P7 (as ``build_retinanet_resnet_fpn_backbone``), for RetinaNet.

    Returns:
        FPN: the pyramid backbone.
    """
    bottom_up = build_small_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_in = bottom_up.output_shape()["res5"].channels
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(top_in, out_channels),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
