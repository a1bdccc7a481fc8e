"""Sigmoid classification losses for the dense heads: RPN objectness and RetinaNet classes.

A head calls its loss once per batch::

    loss(logits, targets, valid, level_sizes)

with ``logits`` and 0/1 ``targets`` of shape (N, R, K) (K = 1 for the RPN's objectness), ``valid``
the (N, R) mask of anchors that are not ignored and ``level_sizes`` the anchors per pyramid level
along dim 1. It returns the loss summed over the valid anchors, which the head divides by its
normaliser (RPN: BATCH_SIZE_PER_IMAGE x images; RetinaNet: moving average of the positives) -
unless ``normalized`` is True (GHM-C normalises by its own sample count).
"""
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss_jit

from ..validation import Float, read_params
from .registry import CLASSIFICATION_LOSS_REGISTRY, Loss

__all__ = ["ClassificationLoss", "BinaryCrossEntropyLoss", "SigmoidFocalLoss"]


class ClassificationLoss(Loss):
    """Interface of a sigmoid classification loss (see the module docstring)."""

    def forward(self, logits, targets, valid, level_sizes=None):
        """
        Args:
            logits, targets (Tensor): (N, R, K).
            valid (Tensor[bool]): (N, R).
            level_sizes (list[int] or None): anchors per level along dim 1.

        Returns:
            Tensor: scalar loss.
        """
        raise NotImplementedError


@CLASSIFICATION_LOSS_REGISTRY.register()
class BinaryCrossEntropyLoss(ClassificationLoss):
    """"bce": sigmoid binary cross-entropy summed over the valid anchors (Detectron2's RPN loss)."""

    name = "bce"

    def forward(self, logits, targets, valid, level_sizes=None):
        return F.binary_cross_entropy_with_logits(logits[valid], targets[valid], reduction="sum")


@CLASSIFICATION_LOSS_REGISTRY.register()
class SigmoidFocalLoss(ClassificationLoss):
    """
    "focal": Detectron2's sigmoid focal loss (RetinaNet), summed over the valid anchors. Its
    parameters are Detectron2's MODEL.RETINANET.FOCAL_LOSS_ALPHA / GAMMA in every head that uses
    it (also as the RPN's objectness loss).
    """

    name = "focal"
    PARAMS = {"focal_loss_alpha": Float(), "focal_loss_gamma": Float(low=0.0)}

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0):
        """
        Args:
            alpha (float): weight of the positives (negative: no weighting, as in fvcore).
            gamma (float): focusing parameter, >= 0.
        """
        super().__init__()
        self.alpha = self.PARAMS["focal_loss_alpha"].check(alpha, "alpha")
        self.gamma = self.PARAMS["focal_loss_gamma"].check(gamma, "gamma")

    @classmethod
    def from_config(cls, cfg, head_key):
        """Reads Detectron2's MODEL.RETINANET.FOCAL_LOSS_ALPHA / FOCAL_LOSS_GAMMA."""
        p = read_params(cfg, "MODEL.RETINANET", cls.PARAMS)
        return cls(p["focal_loss_alpha"], p["focal_loss_gamma"])

    def forward(self, logits, targets, valid, level_sizes=None):
        return sigmoid_focal_loss_jit(
            logits[valid], targets[valid], alpha=self.alpha, gamma=self.gamma, reduction="sum"
        )

    def extra_repr(self):
        return f"alpha={self.alpha}, gamma={self.gamma}"
