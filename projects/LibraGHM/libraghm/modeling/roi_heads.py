"""StandardROIHeads with a pluggable sampler (random, IoU-balanced, instance-balanced, OHEM, none)
and a pluggable box-regression loss.

    MODEL.ROI_HEADS.NAME: "LibraGHMROIHeads"
    MODEL.ROI_HEADS.SAMPLER: "IoUBalancedSampler"      # any name in SAMPLER_REGISTRY
    MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE: "balanced_l1"   # any name in BOX_REG_LOSS_REGISTRY
"""
import contextlib
from typing import Dict, List, Tuple

import torch

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage, get_event_storage

from ..events import checked_log_period, log_negative_iou_histogram, negative_ious, storage_to_log
from ..sampling import IoURecordingMatcher, Sampler, build_sampler
from ..validation import Float, Int, check_params, read_params
from .fast_rcnn import LibraGHMFastRCNNOutputLayers

__all__ = ["LibraGHMROIHeads", "SAMPLING_PARAMS", "attach_sampler", "sampling_from_config"]

#: Detectron2's own sampling keys of MODEL.ROI_HEADS / MODEL.RPN, checked by LibraGHM's heads.
SAMPLING_PARAMS = {"batch_size_per_image": Int(low=1), "positive_fraction": Float(0.0, 1.0)}


def sampling_from_config(cfg, head_key):
    """
    The sampling arguments of a LibraGHM head, read from the config and checked.

    Args:
        cfg (CfgNode): the model config.
        head_key (str): "MODEL.ROI_HEADS" or "MODEL.RPN".

    Returns:
        dict: ``sampler`` and ``log_period``.
    """
    read_params(cfg, head_key, SAMPLING_PARAMS)
    return {"sampler": build_sampler(cfg, head_key),
            "log_period": checked_log_period(cfg.LIBRAGHM.LOG_PERIOD, "LIBRAGHM.LOG_PERIOD")}


def attach_sampler(head, sampler, log_period, matcher_attr):
    """
    Check a Detectron2 head's own sampling arguments and give it a sampler (and, for samplers that
    need IoUs, a recording copy of its matcher).

    Args:
        head (nn.Module): an RPN or ROI heads, after Detectron2's ``__init__``.
        sampler (Sampler): the sampler.
        log_period (int): LibraGHM's statistics period.
        matcher_attr (str): "anchor_matcher" or "proposal_matcher".
    """
    check_params(SAMPLING_PARAMS, batch_size_per_image=head.batch_size_per_image,
                 positive_fraction=head.positive_fraction)
    head.sampler = sampler
    head.log_period = checked_log_period(log_period)
    setattr(head, matcher_attr, IoURecordingMatcher.for_sampler(getattr(head, matcher_attr), sampler))


@contextlib.contextmanager
def _discarded_events():
    """Send the events logged inside the block to a throw-away EventStorage."""
    with EventStorage(get_event_storage().iter):
        yield


@ROI_HEADS_REGISTRY.register()
class LibraGHMROIHeads(StandardROIHeads):
    """
    :class:`StandardROIHeads` (box, mask and keypoint heads unchanged) whose proposal sampling is
    a :class:`~libraghm.sampling.Sampler` and whose box predictor is a
    :class:`LibraGHMFastRCNNOutputLayers` (its box-regression loss from the loss registry).

    Overrides (Detectron2 methods):

    - ``ROIHeads._sample_proposals``: labels the matched proposals as Detectron2 does and lets
      the sampler choose. Samplers that need IoUs get them from the proposal matcher, wrapped in
      an :class:`IoURecordingMatcher` (same matching, plus a record of the IoUs).
    - ``ROIHeads.label_and_sample_proposals`` (extended): logs the IoU histogram of the sampled
      negatives (``roi_head/neg_iou_hist/...``, see :mod:`libraghm.events`).
    - ``StandardROIHeads._init_box_head`` (extended): the box predictor.
    - ``StandardROIHeads.forward``, in training with a hard-example-mining sampler (OHEM) only:
      a read-only pass of the box head scores every labelled candidate, the sampler picks the
      hard ones, and the box/mask/keypoint heads train on them as the stock heads do.
    """

    @configurable
    def __init__(self, *, sampler: Sampler, log_period: int = 0, **kwargs):
        """
        Args:
            sampler (Sampler): chooses the proposals every image trains on.
            log_period (int): log the sampled negatives' IoU histogram every this many
                iterations (0: never).
            kwargs: arguments of :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        if sampler.mines_hard_examples and not hasattr(self.box_predictor, "per_roi_losses"):
            raise ValueError(
                f"{sampler!r} ranks RoIs by their loss and needs a box predictor with "
                "per_roi_losses (LibraGHMFastRCNNOutputLayers)."
            )
        attach_sampler(self, sampler, log_period, "proposal_matcher")

    @classmethod
    def from_config(cls, cfg, input_shape):
        """Adds ``sampler`` (``MODEL.ROI_HEADS.SAMPLER``) and ``log_period``, checked."""
        ret = super().from_config(cfg, input_shape)
        ret.update(sampling_from_config(cfg, "MODEL.ROI_HEADS"))
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        """
        Extends ``StandardROIHeads._init_box_head``: the box predictor is a
        :class:`LibraGHMFastRCNNOutputLayers` that starts from the stock predictor's initial
        weights. It is built with the random-number stream forked, so that the rest of the model
        is initialised exactly as a stock model with the same seed.
        """
        ret = super()._init_box_head(cfg, input_shape)
        stock = ret["box_predictor"]
        with torch.random.fork_rng(devices=[]):
            predictor = LibraGHMFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        predictor.cls_score.load_state_dict(stock.cls_score.state_dict())
        predictor.bbox_pred.load_state_dict(stock.bbox_pred.state_dict())
        ret["box_predictor"] = predictor
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
            matched_labels (Tensor): (N,) the matcher's label (0 background, -1 ignore, 1 fg).
            gt_classes (Tensor): (M,) class of every ground truth.

        Returns:
            Tensor: indices of the sampled proposals.
            Tensor: their labels (a class in ``[0, num_classes)``, ``num_classes`` = background).
        """
        if gt_classes.numel() > 0:
            labels = gt_classes[matched_idxs]
            labels = torch.where(matched_labels == 0, self.num_classes, labels)
            labels = torch.where(matched_labels == -1, -1, labels)
        else:
            labels = torch.full_like(matched_idxs, self.num_classes)
        match = {}
        if self.sampler.needs_match_quality:
            record = self.proposal_matcher.checked_last_match(labels.shape[0], "proposal")
            match = dict(ious=record.ious.to(labels.device), gt_index=matched_idxs,
                         num_gt=gt_classes.numel())
        sampled = self.sampler.sample_proposals(
            labels, self.batch_size_per_image, self.positive_fraction, self.num_classes, **match
        )
        return sampled, labels[sampled]

    def forward(self, images, features, proposals, targets=None):
        """
        Overrides ``StandardROIHeads.forward`` in training with a hard-example-mining sampler;
        otherwise the stock method. Args/Returns: as :meth:`detectron2.modeling.ROIHeads.forward`.
        """
        if not (self.training and self.sampler.mines_hard_examples):
            return super().forward(images, features, proposals, targets)
        assert targets, "'targets' argument is required during training"
        # The stock method logs fg/bg counts of what it returns (here: all candidates); the
        # counts of the selected RoIs are logged under the same names in sample_hard_examples.
        with _discarded_events():
            candidates = self.label_and_sample_proposals(proposals, targets)
        proposals = self.sample_hard_examples(features, candidates)
        losses = self._forward_box(features, proposals)
        losses.update(self._forward_mask(features, proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    @torch.no_grad()
    def hard_example_indices(
        self, features: Dict[str, torch.Tensor], candidates: List[Instances]
    ) -> List[torch.Tensor]:
        """
        Run the read-only box head once over the candidates of all images, get every RoI's losses
        from the box predictor and let the sampler pick the hard examples.

        Args:
            features (dict[str, Tensor]): the ROI heads' input features.
            candidates (list[Instances]): per image, all labelled candidates.

        Returns:
            list[Tensor]: per image, the indices into its candidates of the selected RoIs.
        """
        num_images = len(candidates)
        sizes = [len(c) for c in candidates]
        device = candidates[0].proposal_boxes.tensor.device
        image_ids = torch.repeat_interleave(
            torch.arange(num_images, device=device), torch.as_tensor(sizes, device=device)
        )
        if sum(sizes) == 0:
            return [image_ids.new_zeros(0) for _ in candidates]
        box_features = self.box_pooler(
            [features[f] for f in self.box_in_features], [c.proposal_boxes for c in candidates]
        )
        predictions = self.box_predictor(self.box_head(box_features))
        del box_features
        losses = self.box_predictor.per_roi_losses(
            predictions, candidates, with_box_reg=self.sampler.uses_box_loss
        )
        keep = self.sampler.select_hard_examples(
            losses["loss_cls"],
            losses["loss_box_reg"],
            cat([c.proposal_boxes.tensor for c in candidates], dim=0),
            cat([c.gt_classes for c in candidates], dim=0),
            image_ids,
            num_images,
            self.batch_size_per_image,
            self.positive_fraction,
            self.num_classes,
        )
        # keep is grouped by image: split it and make it relative to each image's first RoI.
        counts = torch.bincount(image_ids[keep], minlength=num_images).tolist()
        starts = [0]
        for s in sizes[:-1]:
            starts.append(starts[-1] + s)
        return [k - s for k, s in zip(torch.split(keep, counts), starts)]

    def sample_hard_examples(
        self, features: Dict[str, torch.Tensor], candidates: List[Instances]
    ) -> List[Instances]:
        """
        Select the hard-example training RoIs of every image and log their fg/bg counts.

        Args:
            features (dict[str, Tensor]): the ROI heads' input features.
            candidates (list[Instances]): per image, all labelled candidates.

        Returns:
            list[Instances]: per image, the selected candidates (all their fields).
        """
        indices = self.hard_example_indices(features, candidates)
        selected = [c[i] for c, i in zip(candidates, indices)]
        num_fg = [int((s.gt_classes < self.num_classes).sum()) for s in selected]
        num_images = max(len(selected), 1)
        storage = get_event_storage()
        storage.put_scalar("roi_head/num_fg_samples", sum(num_fg) / num_images)
        storage.put_scalar(
            "roi_head/num_bg_samples", sum(len(s) - f for s, f in zip(selected, num_fg)) / num_images
        )
        storage.put_scalar(
            "roi_head/ohem_num_candidates", sum(len(c) for c in candidates) / num_images
        )
        if storage_to_log(self.log_period) is not None:
            # The hard negatives (Libra R-CNN's figure 2) and the population they came from.
            hist = "roi_head/neg_iou_hist"
            log_negative_iou_histogram(storage, hist, negative_ious(selected, self.num_classes))
            cand = negative_ious(candidates, self.num_classes)
            log_negative_iou_histogram(storage, "roi_head/cand_neg_iou_hist", cand)
        return selected
