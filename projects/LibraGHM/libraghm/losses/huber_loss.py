"""Huber loss on the box deltas: EfficientDet's box-regression loss, as ``BBOX_REG_LOSS_TYPE: huber``.

Per coordinate, with ``d = predicted delta - target delta``::

    huber(d) = 0.5 * d**2                    if |d| <= delta
               delta * (|d| - 0.5 * delta)   otherwise

i.e. ``delta`` times Detectron2's smooth L1 with ``beta = delta``. The loss is
``LOSS_WEIGHT * sum huber(d)`` over the 4 coordinates of every foreground box; the head divides it
by its normaliser (RetinaNet / EfficientDet: the moving average of the number of foreground
anchors), as it does smooth L1.

EfficientDet (Tan, Pang and Le, CVPR 2020) uses ``delta = 0.1`` and a box-loss weight of 50 on a
loss divided by 4 x the number of positive anchors (one term per coordinate), which is
``LOSS_WEIGHT = 50 / 4 = 12.5`` here (the defaults of ``MODEL.HUBER``); in smooth-L1 terms
``12.5 * huber_0.1 = 1.25 * smooth_l1(beta=0.1)``.
"""
import torch
import torch.nn.functional as F

from ..validation import Float, check_params, read_params
from .box_regression import BoxRegressionLoss, dense_box_regression_deltas
from .registry import BOX_REG_LOSS_REGISTRY

__all__ = ["HuberLoss"]


@BOX_REG_LOSS_REGISTRY.register()
class HuberLoss(BoxRegressionLoss):
    """
    "huber": ``loss_weight * huber_delta`` of the box deltas, summed over the foreground boxes and
    their coordinates (the head normalises it). Parameters from ``MODEL.HUBER``, shared by every
    head that uses this type.
    """

    name = "huber"
    #: Valid values of the arguments (and of the MODEL.HUBER keys).
    PARAMS = {"delta": Float(low=0.0, low_open=True), "loss_weight": Float(low=0.0)}

    def __init__(self, delta: float = 0.1, loss_weight: float = 12.5):
        """
        Args:
            delta (float): where the loss turns from quadratic to linear, > 0.
            loss_weight (float): factor of the summed loss, >= 0.
        """
        super().__init__()
        p = check_params(self.PARAMS, delta=delta, loss_weight=loss_weight)
        self.delta, self.loss_weight = p["delta"], p["loss_weight"]

    @classmethod
    def from_config(cls, cfg, head_key):
        """Reads ``MODEL.HUBER.DELTA`` and ``MODEL.HUBER.LOSS_WEIGHT`` (whatever the head)."""
        return cls(**read_params(cfg, "MODEL.HUBER", cls.PARAMS))

    def elementwise(self, pred_deltas: torch.Tensor, target_deltas: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred_deltas, target_deltas (Tensor): same shape.

        Returns:
            Tensor: ``loss_weight * huber(pred - target)``, element-wise, in float32 at least.
        """
        dtype = torch.promote_types(pred_deltas.dtype, torch.float32)
        loss = F.huber_loss(pred_deltas.to(dtype), target_deltas.to(dtype), reduction="none",
                            delta=self.delta)
        return loss * self.loss_weight

    def forward(self, anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask):
        pred, target = dense_box_regression_deltas(
            anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask
        )
        return self.elementwise(pred, target).sum()

    def per_box(self, proposal_boxes, gt_boxes, pred_deltas, box2box_transform):
        target = box2box_transform.get_deltas(proposal_boxes, gt_boxes)
        return self.elementwise(pred_deltas, target).sum(dim=1)

    def extra_repr(self):
        return f"delta={self.delta}, loss_weight={self.loss_weight}"
