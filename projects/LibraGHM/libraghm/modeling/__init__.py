"""LibraGHM modeling: Detectron2 subclasses that receive samplers and losses."""
# <imports>
from .fast_rcnn import LibraGHMFastRCNNOutputLayers  # noqa: F401
from .roi_heads import LibraGHMROIHeads  # noqa: F401
from .rpn import LibraGHMRPN  # noqa: F401
from .retinanet import LibraGHMRetinaNet  # noqa: F401
from .efficientdet_head import EfficientDetHead  # noqa: F401
from .efficientdet import EfficientDet  # noqa: F401
from .efficientdet_presets import (  # noqa: F401
    EFFICIENTDET_PRESETS, apply_efficientdet_preset, check_efficientdet_preset,
)
from . import renamed  # noqa: F401
# </imports>
