"""A narrow ResNet bottom-up and its FPN wrappers, for configs that train from scratch on a CPU.

Detectron2's ``build_resnet_backbone`` fixes the width of ResNet-18/34 at 64 channels in res2.
These builders assemble Detectron2's own ``BasicStem``, ``BasicBlock`` and ``ResNet`` with the
stage widths of ``MODEL.SMALL_RESNET.WIDTHS`` and the block counts of
``MODEL.SMALL_RESNET.BLOCKS``; everything else (norm, freeze_at, out_features) comes from
``MODEL.RESNETS``. :func:`make_small_resnet` builds the same network from plain arguments, for
LazyConfig files (configs/Shapes-Detection/lazy/).
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

from ..validation import IntList, as_list, check_params, config_keys, read_params
from .fpn import fpn_on

__all__ = ["make_small_resnet", "build_small_resnet_backbone", "build_small_resnet_fpn_backbone",
           "build_small_resnet_retinanet_fpn_backbone"]

#: Valid values of MODEL.SMALL_RESNET: stage widths and block counts of res2..res5.
PARAMS = {"widths": IntList(4), "blocks": IntList(4)}


def make_small_resnet(widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1), *, in_channels: int = 3,
                      norm: str = "BN", out_features=("res2", "res3", "res4", "res5"),
                      freeze_at: int = 0) -> ResNet:
    """
    A ResNet of BasicBlocks with given stage widths, from plain arguments (for LazyConfig files;
    the yaml builders below call it with the MODEL.SMALL_RESNET / MODEL.RESNETS keys).

    Stage ``i`` (res2..res5) has ``blocks[i]`` BasicBlocks of ``widths[i]`` channels; res2 keeps
    the stem's stride (4), every later stage halves the resolution. Stages after the last one
    named in ``out_features`` are not built.

    Args:
        widths (list[int]): 4 stage widths, each >= 1; the stem has ``widths[0]`` channels.
        blocks (list[int]): 4 block counts, each >= 1.
        in_channels (int): channels of the input image.
        norm (str): normalisation of the stem and the blocks (e.g. "BN", "FrozenBN", "GN", "").
        out_features (list[str]): the outputs, names among "stem", "res2".."res5".
        freeze_at (int): freeze the stem (1) and the first ``freeze_at - 1`` stages; 0 = none.

    Returns:
        ResNet: a Detectron2 ResNet.
    """
    p = check_params(PARAMS, widths=as_list(widths), blocks=as_list(blocks))
    widths, blocks = p["widths"], p["blocks"]
    if any(a == b for a, b in zip(widths[:-1], widths[1:])):
        # Detectron2's BasicBlock has a projection shortcut only where the width changes, and
        # every stage after res2 halves the resolution.
        raise ValueError(f"widths = {widths} is invalid: expected consecutive stages of "
                         "different widths.")
    out_features = list(out_features)
    stem = BasicStem(in_channels=in_channels, out_channels=widths[0], norm=norm)
    stages = []
    for i, (w, n) in enumerate(zip(widths, blocks)):
        stages.append(ResNet.make_stage(
            BasicBlock, n, stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
            in_channels=widths[max(i - 1, 0)], out_channels=w, norm=norm,
        ))
        if f"res{i + 2}" == max(out_features):
            break
    return ResNet(stem, stages, out_features=out_features, freeze_at=freeze_at)


@BACKBONE_REGISTRY.register()
def build_small_resnet_backbone(cfg, input_shape: ShapeSpec):
    """
    Build a ResNet of BasicBlocks with configurable stage widths (:func:`make_small_resnet` with
    ``MODEL.SMALL_RESNET.{WIDTHS, BLOCKS}``, ``MODEL.RESNETS.{NORM, OUT_FEATURES}`` and
    ``MODEL.BACKBONE.FREEZE_AT``).

    Returns:
        ResNet: a Detectron2 ResNet with outputs ``MODEL.RESNETS.OUT_FEATURES``.
    """
    p = read_params(cfg, "MODEL.SMALL_RESNET", PARAMS)
    with config_keys("MODEL.SMALL_RESNET", list(PARAMS)):
        return make_small_resnet(
            p["widths"],
            p["blocks"],
            in_channels=input_shape.channels,
            norm=cfg.MODEL.RESNETS.NORM,
            out_features=cfg.MODEL.RESNETS.OUT_FEATURES,
            freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        )


@BACKBONE_REGISTRY.register()
def build_small_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    A small ResNet + FPN with P2-P6 (as ``build_resnet_fpn_backbone``), for Faster R-CNN.

    Returns:
        FPN: the pyramid backbone.
    """
    return fpn_on(build_small_resnet_backbone(cfg, input_shape), cfg, retinanet=False,
                  producer="MODEL.SMALL_RESNET")


@BACKBONE_REGISTRY.register()
def build_small_resnet_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    A small ResNet + FPN with P3-P7 (as ``build_retinanet_resnet_fpn_backbone``), for RetinaNet.

    Returns:
        FPN: the pyramid backbone.
    """
    return fpn_on(build_small_resnet_backbone(cfg, input_shape), cfg, retinanet=True,
                  producer="MODEL.SMALL_RESNET")
