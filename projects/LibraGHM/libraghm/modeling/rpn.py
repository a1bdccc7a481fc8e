"""RPN with a pluggable anchor sampler, objectness loss and box-regression loss.

    MODEL.PROPOSAL_GENERATOR.NAME: "LibraGHMRPN"
    MODEL.RPN.SAMPLER: "RandomSampler"          # or IoUBalancedSampler, InstanceBalancedSampler, NoSampling
    MODEL.RPN.OBJECTNESS_LOSS_TYPE: "ghm_c"      # or "bce" (Detectron2's)
    MODEL.RPN.BBOX_REG_LOSS_TYPE: "smooth_l1"    # any name in BOX_REG_LOSS_REGISTRY
"""
import torch

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN

from ..events import log_gradient_norms, log_score_collapse, storage_to_log
from ..losses import BOX_REG_LOSS_REGISTRY, CLASSIFICATION_LOSS_REGISTRY, build_loss
from ..losses import GHMC, BoxRegressionLoss, ClassificationLoss, GradientHarmonizer
from ..sampling import Sampler
from .roi_heads import attach_sampler, sampling_from_config

__all__ = ["LibraGHMRPN"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class LibraGHMRPN(RPN):
    """
    Detectron2's :class:`RPN` whose anchor sampling is a :class:`~libraghm.sampling.Sampler` and
    whose losses are modules from LibraGHM's registries. Overrides ``RPN._subsample_labels``
    (the sampler chooses; IoU-aware samplers read the anchor matcher's record, see
    :class:`IoURecordingMatcher`) and ``RPN.losses``.

    Losses: ``loss_rpn_cls`` is the objectness loss over the sampled anchors and ``loss_rpn_loc``
    the box-regression loss over the sampled positives, each divided by BATCH_SIZE_PER_IMAGE x
    images as in Detectron2 unless the loss normalises itself (GHM-C, GHM-R), then times
    MODEL.RPN.LOSS_WEIGHT / BBOX_REG_LOSS_WEIGHT. With "bce" + "smooth_l1" and the random sampler
    this is Detectron2's RPN loss exactly. The anchor counts (``rpn/num_pos_anchors``,
    ``rpn/num_neg_anchors``) and, for GHM-C, the objectness gradient-norm histogram
    (``rpn_ghm_c/...``) are logged every ``log_period`` iterations.
    """

    @configurable
    def __init__(
        self,
        *,
        sampler: Sampler,
        objectness_loss: ClassificationLoss,
        box_reg_loss: BoxRegressionLoss,
        log_period: int = 0,
        **kwargs,
    ):
        """
        Args:
            sampler (Sampler): chooses the anchors of every image.
            objectness_loss (ClassificationLoss): e.g. BinaryCrossEntropyLoss or GHMC.
            box_reg_loss (BoxRegressionLoss): e.g. SmoothL1Loss, BalancedL1Loss, GHMR.
            log_period (int): log the statistics every this many iterations (0: never).
            kwargs: arguments of :class:`RPN` (``box_reg_loss_type`` is taken from the loss).
        """
        kwargs["box_reg_loss_type"] = box_reg_loss.name
        super().__init__(**kwargs)
        if sampler.mines_hard_examples:
            raise ValueError(f"{sampler!r} works in the ROI heads only, not in the RPN.")
        attach_sampler(self, sampler, log_period, "anchor_matcher")
        self.objectness_loss = objectness_loss
        self.box_reg_loss = box_reg_loss

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.pop("box_reg_loss_type")
        ret.update(sampling_from_config(cfg, "MODEL.RPN"))
        ret["objectness_loss"] = build_loss(
            CLASSIFICATION_LOSS_REGISTRY, cfg, "MODEL.RPN", "OBJECTNESS_LOSS_TYPE"
        )
        ret["box_reg_loss"] = build_loss(BOX_REG_LOSS_REGISTRY, cfg, "MODEL.RPN", "BBOX_REG_LOSS_TYPE")
        return ret

    def _subsample_labels(self, label: torch.Tensor) -> torch.Tensor:
        """
        Overrides ``RPN._subsample_labels``: keep the sampled anchors' labels, set the others
        to -1 (ignore).

        Args:
            label (Tensor): (R,) anchor labels in {-1, 0, 1}.

        Returns:
            Tensor: (R,) the labels after sampling.
        """
        match = {}
        if self.sampler.needs_match_quality:
            record = self.anchor_matcher.checked_last_match(label.shape[0], "anchor")
            match = dict(ious=record.ious.to(label.device), gt_index=record.matches.to(label.device),
                         num_gt=record.num_gt)
        pos_idx, neg_idx = self.sampler(
            label, self.batch_size_per_image, self.positive_fraction, 0, **match
        )
        sampled = torch.full_like(label, -1)
        sampled.index_fill_(0, pos_idx, 1)
        sampled.index_fill_(0, neg_idx, 0)
        return sampled

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        Overrides :meth:`detectron2.modeling.proposal_generator.RPN.losses`; same arguments and
        return value ({"loss_rpn_cls", "loss_rpn_loc"}).
        """
        labels = torch.stack(gt_labels)  # (N, R) in {-1, 0, 1}
        normalizer = self.batch_size_per_image * len(gt_labels)
        logits = cat(pred_objectness_logits, dim=1).unsqueeze(-1)  # (N, R, 1)
        targets = (labels == 1).to(logits.dtype).unsqueeze(-1)
        valid = labels >= 0
        level_sizes = [x.shape[1] for x in pred_objectness_logits]
        objectness = self.objectness_loss(logits, targets, valid, level_sizes)
        localization = self.box_reg_loss(
            anchors, self.box2box_transform, pred_anchor_deltas, gt_boxes, labels == 1
        )
        losses = {
            "loss_rpn_cls": objectness if self.objectness_loss.normalized else objectness / normalizer,
            "loss_rpn_loc": localization if self.box_reg_loss.normalized else localization / normalizer,
        }
        storage = storage_to_log(self.log_period)
        if storage is not None:
            self._log_statistics(storage, labels, logits, targets, valid)
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    @torch.no_grad()
    def _log_statistics(self, storage, labels, logits, targets, valid):
        num_images = labels.shape[0]
        storage.put_scalar("rpn/num_pos_anchors", float((labels == 1).sum()) / num_images)
        storage.put_scalar("rpn/num_neg_anchors", float((labels == 0).sum()) / num_images)
        if isinstance(self.objectness_loss, GradientHarmonizer):
            g = GHMC.gradient_norm(logits.float(), targets)
            log_gradient_norms(storage, "rpn_ghm_c", g, valid.unsqueeze(-1),
                               self.objectness_loss.bins, self.objectness_loss)
            log_score_collapse(storage, "rpn_ghm_c", logits, valid)
