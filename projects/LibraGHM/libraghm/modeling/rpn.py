"""RPN whose anchor subsampling uses a configurable LibraGHM sampler.

Select it with ``MODEL.PROPOSAL_GENERATOR.NAME: "LibraRPN"`` and pick the sampler with
``LIBRAGHM.RPN_SAMPLER.NAME``. With the default "RandomSampler" it samples exactly what
Detectron2's RPN samples.
"""
import torch

from detectron2.config import configurable
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN

from ..sampling import IoURecordingMatcher, Sampler, build_sampler

__all__ = ["LibraRPN"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class LibraRPN(RPN):
    """
    Detectron2's :class:`RPN` with a pluggable anchor sampler.

    Overrides ``RPN._subsample_labels`` (Detectron2), which ``RPN.label_and_sample_anchors``
    calls once per image right after matching the anchors; the choice of anchors is made by
    :meth:`sample_anchors`, the hook to override. For samplers that need IoUs and matched
    ground truths, the anchor matcher is wrapped in an :class:`IoURecordingMatcher`, whose record
    of the image just matched is what :meth:`sample_anchors` reads.
    """

    @configurable
    def __init__(self, *, sampler: Sampler, **kwargs):
        """
        Args:
            sampler (Sampler): chooses the positive and negative anchors of every image.
            kwargs: arguments of :class:`RPN`.
        """
        super().__init__(**kwargs)
        self.sampler = sampler
        self.anchor_matcher = IoURecordingMatcher.for_sampler(self.anchor_matcher, sampler)

    @classmethod
    def from_config(cls, cfg, input_shape):
        """Adds ``sampler``, built from ``cfg.LIBRAGHM.RPN_SAMPLER`` (validated)."""
        ret = super().from_config(cfg, input_shape)
        ret["sampler"] = build_sampler(cfg, "RPN_SAMPLER")
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
        pos_idx, neg_idx = self.sample_anchors(label)
        sampled = torch.full_like(label, -1)
        sampled.index_fill_(0, pos_idx, 1)
        sampled.index_fill_(0, neg_idx, 0)
        return sampled

    def sample_anchors(self, label: torch.Tensor):
        """
        The sampling hook: choose the positive and negative anchors of one image.

        Args:
            label (Tensor): (R,) anchor labels in {-1, 0, 1}.

        Returns:
            Tensor[int64], Tensor[int64]: indices of the sampled positive and negative anchors
            (at most ``batch_size_per_image`` together).
        """
        match = {}
        if self.sampler.needs_match_quality:
            record = self.anchor_matcher.checked_last_match(label.shape[0], "anchor")
            match = dict(
                ious=record.ious.to(label.device),
                gt_index=record.matches.to(label.device),
                num_gt=record.num_gt,
            )
        return self.sampler(label, self.batch_size_per_image, self.positive_fraction, 0, **match)
