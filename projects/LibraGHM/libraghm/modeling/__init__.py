"""LibraGHM modeling."""
# <imports>
from .ohem_roi_heads import OHEMROIHeads  # noqa: F401
from .ghm_retinanet import GHMRetinaNet  # noqa: F401
from .ghm_rpn import GHMRPN  # noqa: F401
from .roi_heads import LibraROIHeads  # noqa: F401
from .rpn import LibraRPN  # noqa: F401
# </imports>
