"""FastRCNNOutputLayers whose box-regression loss is a LibraGHM loss module."""
from typing import Dict, List

import torch
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.structures import Instances

from ..losses import BOX_REG_LOSS_REGISTRY, BoxRegressionLoss, build_loss
from ..losses.box_regression import SmoothL1Loss

__all__ = ["LibraGHMFastRCNNOutputLayers", "foreground_deltas"]


def foreground_deltas(pred_deltas, gt_classes, num_classes, box_dim):
    """
    The foreground RoIs and the deltas predicted for their ground-truth class.

    Args:
        pred_deltas (Tensor): (R, box_dim) class-agnostic or (R, num_classes * box_dim) deltas.
        gt_classes (Tensor[int64]): (R,) classes in [0, num_classes] (num_classes = background;
            -1 = ignored).
        num_classes (int): number of foreground classes.
        box_dim (int): 4.

    Returns:
        Tensor[int64]: (P,) indices of the foreground RoIs.
        Tensor: (P, box_dim) their deltas.
    """
    fg = torch.nonzero((gt_classes >= 0) & (gt_classes < num_classes)).squeeze(1)
    if pred_deltas.shape[1] == box_dim:  # class-agnostic regression
        return fg, pred_deltas[fg]
    return fg, pred_deltas.view(-1, num_classes, box_dim)[fg, gt_classes[fg]]


class LibraGHMFastRCNNOutputLayers(FastRCNNOutputLayers):
    """
    Detectron2's box predictor with a pluggable box-regression loss (any name of
    :data:`libraghm.losses.BOX_REG_LOSS_REGISTRY` in MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE).
    Overrides :meth:`box_reg_loss`; with Detectron2's loss types it computes exactly the stock
    loss. Adds :meth:`per_roi_losses`, the losses of every RoI that OHEM ranks by.
    """

    @configurable
    def __init__(self, input_shape, *, box_reg_loss: BoxRegressionLoss = None, **kwargs):
        """
        Args:
            input_shape (ShapeSpec): as :class:`FastRCNNOutputLayers`.
            box_reg_loss (BoxRegressionLoss): the loss module (default: Detectron2's smooth L1
                with ``smooth_l1_beta``).
            kwargs: arguments of :class:`FastRCNNOutputLayers` (``box_reg_loss_type`` is taken
                from ``box_reg_loss``).
        """
        if box_reg_loss is None:
            box_reg_loss = SmoothL1Loss(kwargs.get("smooth_l1_beta", 0.0))
        if not isinstance(box_reg_loss, BoxRegressionLoss):
            raise TypeError(f"box_reg_loss must be a BoxRegressionLoss; got {type(box_reg_loss)}.")
        kwargs["box_reg_loss_type"] = box_reg_loss.name
        super().__init__(input_shape, **kwargs)
        self.box_regression_loss = box_reg_loss

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.pop("box_reg_loss_type")
        ret["box_reg_loss"] = build_loss(
            BOX_REG_LOSS_REGISTRY, cfg, "MODEL.ROI_BOX_HEAD", "BBOX_REG_LOSS_TYPE"
        )
        return ret

    def box_reg_loss(self, proposal_boxes, gt_boxes, pred_deltas, gt_classes):
        """
        Overrides :meth:`FastRCNNOutputLayers.box_reg_loss` (same arguments): the loss module's
        sum over the foreground RoIs, divided by the number of RoIs (unless self-normalised).
        """
        fg, fg_deltas = foreground_deltas(
            pred_deltas, gt_classes, self.num_classes, proposal_boxes.shape[1]
        )
        loss = self.box_regression_loss(
            [proposal_boxes[fg]], self.box2box_transform, [fg_deltas.unsqueeze(0)],
            [gt_boxes[fg]], ...,
        )
        if self.box_regression_loss.normalized:
            return loss
        return loss / max(gt_classes.numel(), 1.0)

    @torch.no_grad()
    def per_roi_losses(self, predictions, proposals: List[Instances],
                       with_box_reg: bool = True) -> Dict[str, torch.Tensor]:
        """
        The losses of every RoI, consistent with :meth:`losses` (softmax cross-entropy, or the
        sum of sigmoid cross-entropies with ``use_sigmoid_ce``; the box loss module's
        :meth:`~libraghm.losses.BoxRegressionLoss.per_box` for foreground RoIs, 0 for the
        others), each times its loss weight. Read-only: no loss statistics are updated.

        Args:
            predictions (tuple[Tensor, Tensor]): outputs of :meth:`forward` for the RoIs.
            proposals (list[Instances]): per image, the RoIs with "proposal_boxes",
                "gt_classes" and, for images with ground truth, "gt_boxes".
            with_box_reg (bool): compute the box loss (else it is returned as zeros).

        Returns:
            dict[str, Tensor[R]]: "loss_cls" and "loss_box_reg" of every RoI.
        """
        scores, deltas = predictions
        scores = scores.float()
        labels = cat([p.gt_classes for p in proposals], dim=0)
        if self.use_sigmoid_ce:
            target = F.one_hot(labels, self.num_classes + 1)[:, : self.num_classes].to(scores)
            loss_cls = F.binary_cross_entropy_with_logits(
                scores[:, : self.num_classes], target, reduction="none"
            ).sum(dim=1)
        else:
            loss_cls = F.cross_entropy(scores, labels, reduction="none")
        loss_reg = torch.zeros_like(loss_cls)
        if with_box_reg:
            boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals],
                dim=0,
            )
            fg, fg_deltas = foreground_deltas(deltas, labels, self.num_classes, boxes.shape[1])
            # Called also without foreground RoIs: a loss may synchronise across processes.
            per_box = self.box_regression_loss.per_box(
                boxes[fg], gt_boxes[fg], fg_deltas.float(), self.box2box_transform
            )
            loss_reg[fg] = per_box.to(loss_reg)
        return {
            "loss_cls": loss_cls * self.loss_weight.get("loss_cls", 1.0),
            "loss_box_reg": loss_reg * self.loss_weight.get("loss_box_reg", 1.0),
        }
