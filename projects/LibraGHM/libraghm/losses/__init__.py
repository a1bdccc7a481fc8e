"""LibraGHM losses."""
# <imports>
from .balanced_l1_loss import balanced_l1_loss  # noqa: F401
from .box_regression import (  # noqa: F401  installs the box-regression loss-type dispatcher
    BoxRegLossType,
    box_reg_loss_elementwise,
    register_box_reg_loss_type,
)
from .ghm_loss import GHMC, GHMR, GradientHarmonizer  # noqa: F401
# </imports>
