"""Box-regression losses as modules that LibraGHM's heads own, and Detectron2's four types.

Every head computes its box-regression loss through one call in Detectron2's dense format (the
arguments of ``detectron2.modeling.box_regression._dense_box_regression_loss``)::

    loss(anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask)

returning the loss *summed* over the foreground boxes, which the head divides by its own
normaliser (ROI heads: sampled regions; RPN: anchors per image x images; RetinaNet: moving average
of the positives) - unless the loss sets ``normalized = True`` (GHM-R normalises by its own sample
count). OHEM's ranking reads the loss of every RoI through :meth:`BoxRegressionLoss.per_box`,
which never changes a loss's state.

Detectron2's types ("smooth_l1", "giou", "diou", "ciou") call Detectron2's own function, so a
LibraGHM head computes exactly the stock head's loss with them.
"""
import torch
from fvcore.nn import giou_loss, smooth_l1_loss

from detectron2.layers import ciou_loss, diou_loss
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.structures import Boxes

from ..validation import Float, cfg_node, check_params
from .registry import BOX_REG_LOSS_REGISTRY, Loss

__all__ = [
    "BoxRegressionLoss",
    "SmoothL1Loss",
    "GIoULoss",
    "DIoULoss",
    "CIoULoss",
    "dense_box_regression_deltas",
]


def _cat_anchors(anchors):
    if isinstance(anchors[0], Boxes):
        return type(anchors[0]).cat(list(anchors)).tensor
    return torch.cat(list(anchors), dim=0)


def dense_box_regression_deltas(anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask):
    """
    Predicted and target deltas of the foreground boxes, for a delta-space loss.

    Args:
        anchors: #lvl anchor boxes (Boxes or Tensor), each (Ri, box_dim); R = sum(Ri).
        box2box_transform: Box2BoxTransform encoding targets.
        pred_anchor_deltas: #lvl tensors, each (N, Ri, box_dim).
        gt_boxes: N tensors, each (R, box_dim): the box matched to every anchor.
        fg_mask: (N, R) bool mask of the boxes to compute the loss on, or ``...`` for all.

    Returns:
        (Tensor, Tensor): predicted and target deltas, each (P, box_dim); targets are encoded
        for the P foreground boxes only.
    """
    anchors = _cat_anchors(anchors)
    box_dim = anchors.shape[-1]
    pred = torch.cat(list(pred_anchor_deltas), dim=1)  # (N, R, box_dim)
    matched = torch.stack(list(gt_boxes))  # (N, R, box_dim)
    sources = anchors.unsqueeze(0).expand_as(matched)
    pred, matched, sources = pred[fg_mask], matched[fg_mask], sources[fg_mask]
    target = box2box_transform.get_deltas(
        sources.reshape(-1, box_dim), matched.reshape(-1, box_dim)
    )
    return pred.reshape(-1, box_dim), target


class BoxRegressionLoss(Loss):
    """Interface of a box-regression loss (see the module docstring), selected by BBOX_REG_LOSS_TYPE."""

    def forward(self, anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask):
        """
        Args: as :func:`dense_box_regression_deltas`.

        Returns:
            Tensor: scalar, the loss summed over the foreground boxes (or normalised, see
            ``normalized``).
        """
        raise NotImplementedError

    def per_box(self, proposal_boxes, gt_boxes, pred_deltas, box2box_transform):
        """
        The loss of every box, consistent with :meth:`forward` (whose sum it makes up, up to
        the normalisation of self-normalised losses). Read-only: statistics are not updated.

        Args:
            proposal_boxes, gt_boxes (Tensor): (P, 4) boxes and their matched ground truths.
            pred_deltas (Tensor): (P, 4) predicted deltas.
            box2box_transform: Box2BoxTransform.

        Returns:
            Tensor: (P,) loss per box.
        """
        raise NotImplementedError


class _Detectron2Loss(BoxRegressionLoss):
    """A loss type Detectron2's ``_dense_box_regression_loss`` computes itself."""

    smooth_l1_beta = 0.0

    def forward(self, anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask):
        return _dense_box_regression_loss(
            anchors,
            box2box_transform,
            pred_anchor_deltas,
            gt_boxes,
            fg_mask,
            box_reg_loss_type=self.name,
            smooth_l1_beta=self.smooth_l1_beta,
        )

    def extra_repr(self):
        return f"name={self.name!r}"


@BOX_REG_LOSS_REGISTRY.register()
class SmoothL1Loss(_Detectron2Loss):
    """Detectron2's "smooth_l1" (the head's SMOOTH_L1_BETA / SMOOTH_L1_LOSS_BETA)."""

    name = "smooth_l1"
    PARAMS = {"beta": Float(low=0.0)}

    def __init__(self, beta: float = 0.0):
        """
        Args:
            beta (float): the L1 / L2 transition, >= 0 (0: plain L1).
        """
        super().__init__()
        self.smooth_l1_beta = check_params(self.PARAMS, beta=beta)["beta"]

    @classmethod
    def from_config(cls, cfg, head_key):
        node = cfg_node(cfg, head_key)
        key = "SMOOTH_L1_BETA" if "SMOOTH_L1_BETA" in node else "SMOOTH_L1_LOSS_BETA"
        beta = cls.PARAMS["beta"].check(node[key], f"{head_key}.{key}")
        return cls(beta)

    def per_box(self, proposal_boxes, gt_boxes, pred_deltas, box2box_transform):
        target = box2box_transform.get_deltas(proposal_boxes, gt_boxes)
        return smooth_l1_loss(pred_deltas, target, self.smooth_l1_beta, "none").sum(dim=1)


class _IoUFamilyLoss(_Detectron2Loss):
    loss_fn = None

    def per_box(self, proposal_boxes, gt_boxes, pred_deltas, box2box_transform):
        pred_boxes = box2box_transform.apply_deltas(pred_deltas, proposal_boxes)
        return type(self).loss_fn(pred_boxes, gt_boxes, reduction="none")


@BOX_REG_LOSS_REGISTRY.register()
class GIoULoss(_IoUFamilyLoss):
    """Detectron2's "giou"."""

    name = "giou"
    loss_fn = staticmethod(giou_loss)


@BOX_REG_LOSS_REGISTRY.register()
class DIoULoss(_IoUFamilyLoss):
    """Detectron2's "diou"."""

    name = "diou"
    loss_fn = staticmethod(diou_loss)


@BOX_REG_LOSS_REGISTRY.register()
class CIoULoss(_IoUFamilyLoss):
    """Detectron2's "ciou"."""

    name = "ciou"
    loss_fn = staticmethod(ciou_loss)
