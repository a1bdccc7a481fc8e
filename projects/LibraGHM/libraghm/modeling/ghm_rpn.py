"""RPN whose objectness loss is GHM-C.

Usage from yaml (Faster R-CNN / any model with an RPN)::

    MODEL.PROPOSAL_GENERATOR.NAME: "GHMRPN"
    LIBRAGHM.GHM_RPN.SUBSAMPLE: False   # GHM-C on all valid anchors; True: sample them first
    LIBRAGHM.GHMC: {BINS: 30, MOMENTUM: 0.75, LOSS_WEIGHT: 1.0, ...}
"""
import torch

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator import rpn as _d2_rpn
from detectron2.modeling.proposal_generator.rpn import RPN

from ..events import checked_log_period, log_gradient_norms, storage_to_log
from ..losses.ghm_loss import GHMC

__all__ = ["GHMRPN"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class GHMRPN(RPN):
    """
    Detectron2's RPN with GHM-C as the objectness loss. Overrides :meth:`RPN._subsample_labels`
    (identity unless LIBRAGHM.GHM_RPN.SUBSAMPLE) and :meth:`RPN.losses`.

    ``loss_rpn_cls`` is GHM-C over the valid anchors, normalised by their number (GHM-C's own
    normalisation), times LIBRAGHM.GHMC.LOSS_WEIGHT and MODEL.RPN.LOSS_WEIGHT.
    ``loss_rpn_loc`` is Detectron2's (MODEL.RPN.BBOX_REG_LOSS_TYPE over the positive anchors,
    divided by BATCH_SIZE_PER_IMAGE x images), times MODEL.RPN.BBOX_REG_LOSS_WEIGHT. Without
    subsampling every positive anchor contributes to it, not at most
    POSITIVE_FRACTION x BATCH_SIZE_PER_IMAGE per image.
    The objectness term makes no host synchronisation, and the anchor counts are not logged as
    Detectron2's RPN does; the localization term is Detectron2's function as it is.
    """

    @configurable
    def __init__(self, *, ghm_c, subsample=False, log_period=0, **kwargs):
        """
        Args:
            ghm_c (GHMC): the objectness loss.
            subsample (bool): keep Detectron2's random subsampling of anchors.
            log_period (int): log the objectness gradient-norm histogram and GHM-C's weights
                (``rpn_ghm_c/...``, see :mod:`libraghm.events`) every this many iterations.
            kwargs: arguments of :class:`detectron2.modeling.proposal_generator.RPN`.
        """
        super().__init__(**kwargs)
        self.ghm_c = ghm_c
        self.subsample = bool(subsample)
        self.log_period = checked_log_period(log_period)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["ghm_c"] = GHMC.from_config(cfg)
        ret["subsample"] = cfg.LIBRAGHM.GHM_RPN.SUBSAMPLE
        ret["log_period"] = cfg.LIBRAGHM.LOG_PERIOD
        return ret

    def _subsample_labels(self, label):
        """Overrides :meth:`RPN._subsample_labels`: a no-op unless subsampling is on."""
        return super()._subsample_labels(label) if self.subsample else label

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        Overrides :meth:`detectron2.modeling.proposal_generator.RPN.losses`; same arguments and
        return value ({"loss_rpn_cls", "loss_rpn_loc"}).
        """
        labels = torch.stack(gt_labels)  # (N, R) in {-1, 0, 1}
        level_sizes = [x.shape[1] for x in pred_objectness_logits]
        logits = cat(pred_objectness_logits, dim=1)
        targets = (labels == 1).to(logits.dtype)
        objectness = self.ghm_c(logits, targets, labels >= 0, level_sizes)
        storage = storage_to_log(self.log_period)
        if storage is not None:
            g = GHMC.gradient_norm(logits.detach().float(), targets)
            log_gradient_norms(storage, "rpn_ghm_c", g, labels >= 0, self.ghm_c.bins, self.ghm_c)
        # Looked up at call time, so loss types added to Detectron2's dispatcher apply here too.
        localization = _d2_rpn._dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            gt_boxes,
            labels == 1,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        losses = {
            "loss_rpn_cls": objectness,
            "loss_rpn_loc": localization / (self.batch_size_per_image * len(gt_labels)),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}
