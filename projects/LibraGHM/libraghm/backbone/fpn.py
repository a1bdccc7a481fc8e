"""Detectron2's FPN over any bottom-up backbone, for the R-CNN (P2-P6) and RetinaNet (P3-P7) layouts."""
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

__all__ = ["fpn_on"]


def fpn_on(bottom_up: Backbone, cfg, retinanet: bool, producer: str) -> FPN:
    """
    Detectron2's FPN (``MODEL.FPN`` keys) over ``bottom_up``: P2-P6 with a max-pooled top level
    (as ``build_resnet_fpn_backbone``), or (``retinanet``) P6/P7 made from res5 by
    ``LastLevelP6P7`` (as ``build_retinanet_resnet_fpn_backbone``).

    Args:
        bottom_up (Backbone): outputs named like Detectron2's ResNet ("res2".."res5").
        cfg (CfgNode): the model config.
        retinanet (bool): the RetinaNet layout.
        producer (str): the keys that decide the bottom-up's outputs, for error messages.

    Returns:
        FPN: the pyramid backbone; a mismatch of ``MODEL.FPN.IN_FEATURES`` with the bottom-up fails
        naming the keys.
    """
    outputs = bottom_up.output_shape()
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in outputs]
    if missing or (retinanet and "res5" not in outputs):
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES = {list(cfg.MODEL.FPN.IN_FEATURES)} is invalid with this "
            f"bottom-up: it produces {sorted(outputs)} ({producer}), not "
            f"{missing or ['res5']}" + (" (P6/P7 are made from res5)" if not missing else "") + "."
        )
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if retinanet:
        top_block = LastLevelP6P7(outputs["res5"].channels, out_channels)
    else:
        top_block = LastLevelMaxPool()
    # no check of the heads' features here: the pyramid may be wrapped (BFP), whose builder checks
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES,
               out_channels=out_channels, norm=cfg.MODEL.FPN.NORM, top_block=top_block,
               fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
