"""StandardROIHeads whose proposal subsampling uses a configurable LibraGHM sampler.

Select it with ``MODEL.ROI_HEADS.NAME: "LibraROIHeads"`` and pick the sampler with
``LIBRAGHM.ROI_SAMPLER.NAME`` (e.g. "IoUBalancedSampler" for Libra R-CNN's IoU-balanced
sampling). With the default "RandomSampler" it samples exactly what StandardROIHeads samples.
"""
from typing import Tuple

import torch

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads

from ..events import (
    checked_log_period,
    log_negative_iou_histogram,
    negative_ious,
    storage_to_log,
)
from ..sampling import IoURecordingMatcher, Sampler, build_sampler

__all__ = ["LibraROIHeads"]


@ROI_HEADS_REGISTRY.register()
class LibraROIHeads(StandardROIHeads):
    """
    :class:`StandardROIHeads` (box, mask and keypoint heads unchanged) with a pluggable
    proposal sampler.

    Overrides ``ROIHeads._sample_proposals`` (Detectron2): it labels the matched proposals as
    Detectron2 does (ground-truth class, background = ``num_classes``, ignore = -1) and hands the
    choice of proposals to :meth:`sample_proposals`, the one hook a subclass overrides to
    sample differently. Samplers that need IoUs get them from the proposal matcher, which is
    wrapped in an :class:`IoURecordingMatcher` (same matching, plus a record of the IoUs).

    Extends ``ROIHeads.label_and_sample_proposals`` to log the IoU histogram of the sampled
    negatives (``roi_head/neg_iou_hist/...``, see :mod:`libraghm.events`).
    """

    @configurable
    def __init__(self, *, sampler: Sampler, log_period: int = 0, **kwargs):
        """
        Args:
            sampler (Sampler): chooses the positive and negative proposals of every image.
            log_period (int): log the sampled negatives' IoU histogram every this many
                iterations (0: never).
            kwargs: arguments of :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        self.sampler = sampler
        self.log_period = checked_log_period(log_period)
        self.proposal_matcher = IoURecordingMatcher.for_sampler(self.proposal_matcher, sampler)

    @classmethod
    def from_config(cls, cfg, input_shape):
        """Adds ``sampler``, built from ``cfg.LIBRAGHM.ROI_SAMPLER`` (validated)."""
        ret = super().from_config(cfg, input_shape)
        ret["sampler"] = build_sampler(cfg, "ROI_SAMPLER")
        ret["log_period"] = cfg.LIBRAGHM.LOG_PERIOD
        return ret

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets):
        """
        Extends ``ROIHeads.label_and_sample_proposals`` (same arguments and return value): also
        logs the IoU histogram of the sampled negatives.
        """
        sampled = super().label_and_sample_proposals(proposals, targets)
        storage = storage_to_log(self.log_period)
        if storage is not None:
            ious = negative_ious(sampled, self.num_classes)
            log_negative_iou_histogram(storage, "roi_head/neg_iou_hist", ious)
        return sampled

    def _sample_proposals(
        self, matched_idxs: torch.Tensor, matched_labels: torch.Tensor, gt_classes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Overrides ``ROIHeads._sample_proposals``; same arguments and returns.

        Args:
            matched_idxs (Tensor): (N,) best-matched ground-truth index of every proposal.
            matched_labels (Tensor): (N,) the matcher's label of every proposal (0 background,
                -1 ignore, 1 foreground).
            gt_classes (Tensor): (M,) class of every ground truth.

        Returns:
            Tensor: indices of the sampled proposals.
            Tensor: their classification labels (a class in ``[0, num_classes)`` or
            ``num_classes`` for background).
        """
        if gt_classes.numel() > 0:
            labels = gt_classes[matched_idxs]
            labels = torch.where(matched_labels == 0, self.num_classes, labels)
            labels = torch.where(matched_labels == -1, -1, labels)
        else:
            labels = torch.full_like(matched_idxs, self.num_classes)
        fg_idxs, bg_idxs = self.sample_proposals(labels, matched_idxs, gt_classes.numel())
        sampled_idxs = torch.cat([fg_idxs, bg_idxs], dim=0)
        return sampled_idxs, labels[sampled_idxs]

    def sample_proposals(
        self, labels: torch.Tensor, matched_idxs: torch.Tensor, num_gt: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        The sampling hook: choose the foreground and background proposals of one image.

        Args:
            labels (Tensor[int64]): (N,) class per proposal; ``num_classes`` = background,
                -1 = ignore.
            matched_idxs (Tensor[int64]): (N,) matched ground-truth index per proposal.
            num_gt (int): number of ground truths in the image.

        Returns:
            Tensor[int64], Tensor[int64]: indices of the sampled foreground and background
            proposals (at most ``batch_size_per_image`` together).
        """
        ious = None
        if self.sampler.needs_match_quality:
            record = self.proposal_matcher.checked_last_match(labels.shape[0], "proposal")
            ious = record.ious.to(labels.device)
        return self.sampler(
            labels,
            self.batch_size_per_image,
            self.positive_fraction,
            self.num_classes,
            ious=ious,
            gt_index=matched_idxs,
            num_gt=num_gt,
        )
