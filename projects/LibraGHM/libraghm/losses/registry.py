"""The registries of LibraGHM's losses, and how a head builds the loss its config names.

Two kinds of loss plug into LibraGHM's heads:

- box-regression losses (:class:`~libraghm.losses.box_regression.BoxRegressionLoss`), chosen by
  Detectron2's own ``MODEL.{ROI_BOX_HEAD,RPN,RETINANET}.BBOX_REG_LOSS_TYPE``: Detectron2's
  "smooth_l1", "giou", "diou", "ciou" and LibraGHM's "balanced_l1" and "ghm_r";
- sigmoid classification losses (:class:`~libraghm.losses.classification.ClassificationLoss`),
  chosen by ``MODEL.RPN.OBJECTNESS_LOSS_TYPE`` and ``MODEL.RETINANET.CLS_LOSS_TYPE``: "bce",
  "focal" and "ghm_c".

A loss is a class with a ``name`` and a ``from_config(cfg, head_key)`` classmethod, registered
with one decorator::

    @BOX_REG_LOSS_REGISTRY.register()
    class MyLoss(BoxRegressionLoss):
        name = "my_loss"
        ...

Every head builds its own instance (stateful losses such as GHM keep their statistics per head).
"""
from fvcore.common.registry import Registry
from torch import nn

from ..validation import cfg_node

__all__ = ["BOX_REG_LOSS_REGISTRY", "CLASSIFICATION_LOSS_REGISTRY", "build_loss", "Loss"]


class Loss(nn.Module):
    """
    What every registered loss has.

    Attributes:
        name (str): the value of the config key that selects it.
        normalized (bool): True when the loss divides by its own sample count (GHM), so the head
            must not divide it by its own normaliser.
    """

    name = ""
    normalized = False

    @classmethod
    def from_config(cls, cfg, head_key: str):
        """
        Args:
            cfg (CfgNode): the model config.
            head_key (str): the node of the head that uses the loss, e.g. "MODEL.RPN".

        Returns:
            the loss, built from the keys it reads (none by default).
        """
        return cls()


class LossRegistry(Registry):
    """A :class:`fvcore.common.registry.Registry` whose entries are registered under their
    ``name`` attribute (the value used in yaml), not their class name."""

    def register(self, obj=None):
        """
        Args:
            obj (type, optional): a loss class with a ``name`` attribute; without it, returns a
                decorator.

        Returns:
            the class (or the decorator).
        """
        if obj is None:
            return self.register
        self._do_register(obj.name, obj)
        return obj

    def names(self):
        """The registered names, sorted."""
        return sorted(name for name, _ in self)


BOX_REG_LOSS_REGISTRY = LossRegistry("LIBRAGHM_BOX_REG_LOSS")
BOX_REG_LOSS_REGISTRY.__doc__ = "Box-regression losses, by MODEL.*.BBOX_REG_LOSS_TYPE name."
CLASSIFICATION_LOSS_REGISTRY = LossRegistry("LIBRAGHM_CLASSIFICATION_LOSS")
CLASSIFICATION_LOSS_REGISTRY.__doc__ = (
    "Sigmoid classification losses, by MODEL.RPN.OBJECTNESS_LOSS_TYPE / "
    "MODEL.RETINANET.CLS_LOSS_TYPE name."
)


def build_loss(registry, cfg, head_key: str, type_key: str):
    """
    Build the loss a head's config names.

    Args:
        registry (LossRegistry): :data:`BOX_REG_LOSS_REGISTRY` or :data:`CLASSIFICATION_LOSS_REGISTRY`.
        cfg (CfgNode): the model config.
        head_key (str): the head's node, e.g. "MODEL.ROI_BOX_HEAD".
        type_key (str): the key under it holding the loss name, e.g. "BBOX_REG_LOSS_TYPE".

    Returns:
        nn.Module: the loss, its parameters read and checked by its ``from_config``.
    """
    name = cfg_node(cfg, f"{head_key}.{type_key}")
    if not isinstance(name, str) or name not in registry:
        raise ValueError(
            f"{head_key}.{type_key} = {name!r} is invalid: expected one of {registry.names()} "
            f"(registered in libraghm.losses.{registry._name.replace('LIBRAGHM_', '')}_REGISTRY)."
        )
    return registry.get(name).from_config(cfg, head_key)
