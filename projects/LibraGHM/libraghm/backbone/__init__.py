"""LibraGHM backbones: registered in Detectron2's BACKBONE_REGISTRY on import."""
# <imports>
from .small_resnet import (  # noqa: F401
    build_small_resnet_backbone,
    build_small_resnet_fpn_backbone,
    build_small_resnet_retinanet_fpn_backbone,
)
from .bfp import BalancedFeaturePyramid, build_bfp_backbone  # noqa: F401
from .bifpn import BiFPN, build_bifpn_backbone  # noqa: F401
from .efficientnet import EfficientNetBackbone, build_efficientnet_backbone  # noqa: F401
from .fpn import fpn_on  # noqa: F401
# </imports>
