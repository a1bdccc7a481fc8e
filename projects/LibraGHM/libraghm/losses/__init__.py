"""LibraGHM losses: box-regression and sigmoid classification losses, by registry name."""
# <imports>
from .registry import BOX_REG_LOSS_REGISTRY, CLASSIFICATION_LOSS_REGISTRY, build_loss  # noqa: F401
from .box_regression import BoxRegressionLoss, dense_box_regression_deltas  # noqa: F401
from .classification import ClassificationLoss  # noqa: F401
from .balanced_l1_loss import BalancedL1Loss, balanced_l1_loss  # noqa: F401
from .ghm_loss import GHMC, GHMR, GradientHarmonizer  # noqa: F401
from .huber_loss import HuberLoss  # noqa: F401
# </imports>
