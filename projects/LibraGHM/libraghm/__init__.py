"""LibraGHM: balanced-learning methods for Detectron2.

Importing this package registers all of LibraGHM's parts in Detectron2's registries
(backbones, proposal generators, ROI heads, meta-architectures) and the built-in datasets.
"""
from .config import add_libraghm_config, check_config
from .solver import maybe_add_full_model_gradient_clipping
from . import data  # noqa: F401  registers the built-in "shapes" datasets
from . import backbone  # noqa: F401
from . import sampling  # noqa: F401
from . import losses  # noqa: F401
from . import modeling  # noqa: F401
from . import model_zoo  # noqa: F401  registers the libraghm:// checkpoint prefix

__version__ = "0.1.0"
