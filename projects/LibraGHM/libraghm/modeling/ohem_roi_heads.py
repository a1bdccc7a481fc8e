"""Online hard example mining (OHEM) in the ROI heads' subsampling step.

Shrivastava, Gupta and Girshick, "Training Region-based Object Detectors with Online Hard Example
Mining", CVPR 2016. Instead of sampling the RoIs that train the box head at random, a read-only
copy of the ROI network (here: the same box head under ``torch.no_grad``) scores *all* candidate
RoIs of the batch, and the RoIs with the largest loss ("hard examples") are the ones trained on.

Two modes (``LIBRAGHM.OHEM.MODE``):

- ``"paper"`` (default): rank every candidate by classification + box-regression loss, suppress
  duplicates by NMS over the loss-ranked RoI boxes (IoU ``LIBRAGHM.OHEM.NMS_THRESH``, 0.7; a
  value of 1.0 turns NMS off), keep the top ``B = MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE`` RoIs per
  image regardless of their label.
- ``"mmdet"``: mmdetection's ``OHEMSampler`` behaviour: rank by classification loss only, no
  NMS, keep the positive quota of ``MODEL.ROI_HEADS.POSITIVE_FRACTION`` (hardest positives up to
  ``int(B * POSITIVE_FRACTION)``, hardest negatives for the rest of ``B``).

The read-only pass is one pooler + box-head pass over the candidates of every image of the batch;
the selection (NMS with the image index as the NMS group, ranking within image) is vectorised.
"""

import contextlib
from typing import Dict, List

import torch
from fvcore.nn import giou_loss, smooth_l1_loss
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import batched_nms, cat, ciou_loss, diou_loss
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage, get_event_storage

from ..events import (
    checked_log_period,
    log_negative_iou_histogram,
    negative_ious,
    storage_to_log,
)
from ..losses.box_regression import BOX_REG_LOSS_REGISTRY, box_reg_loss_elementwise

__all__ = [
    "OHEMROIHeads",
    "OHEM_MODES",
    "OHEM_BOX_REG_LOSSES",
    "register_ohem_box_reg_loss",
    "ohem_select_paper",
    "ohem_select_mmdet",
]

OHEM_MODES = ("paper", "mmdet")

# Per-RoI versions of the box head's regression losses, by MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE.
# Each is ``fn(box_predictor, proposal_boxes, gt_boxes, pred_deltas) -> Tensor[R]``, with boxes
# and the deltas predicted for the ground-truth class all of shape (R, 4), and must equal the
# summand of the predictor's sum-reduced loss for each RoI (before its loss weight).
# Detectron2's types are here; LibraGHM's delta-space types (libraghm.losses.box_regression's
# BOX_REG_LOSS_REGISTRY, e.g. "balanced_l1") are used through box_reg_loss_elementwise.
OHEM_BOX_REG_LOSSES = {}


def register_ohem_box_reg_loss(name):
    """
    Register a per-RoI box-regression loss for OHEM's ranking, for a box head whose
    ``MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE`` is ``name`` (decorator).

    Args:
        name (str): the loss type name, as in ``MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE``.

    Returns:
        Callable: a decorator that stores its function in :data:`OHEM_BOX_REG_LOSSES`.
    """

    def deco(fn):
        OHEM_BOX_REG_LOSSES[name] = fn
        return fn

    return deco


@register_ohem_box_reg_loss("smooth_l1")
def _smooth_l1_per_roi(box_predictor, proposal_boxes, gt_boxes, pred_deltas):
    target = box_predictor.box2box_transform.get_deltas(proposal_boxes, gt_boxes)
    return smooth_l1_loss(pred_deltas, target, box_predictor.smooth_l1_beta, "none").sum(dim=1)


def _iou_family(loss_fn):
    def per_roi(box_predictor, proposal_boxes, gt_boxes, pred_deltas):
        pred_boxes = box_predictor.box2box_transform.apply_deltas(pred_deltas, proposal_boxes)
        return loss_fn(pred_boxes, gt_boxes, reduction="none")

    return per_roi


register_ohem_box_reg_loss("giou")(_iou_family(giou_loss))
register_ohem_box_reg_loss("diou")(_iou_family(diou_loss))
register_ohem_box_reg_loss("ciou")(_iou_family(ciou_loss))


def _per_roi_box_reg_loss_fn(loss_type):
    """The per-RoI regression loss for a box-head loss type, or None if there is none."""
    fn = OHEM_BOX_REG_LOSSES.get(str(loss_type))
    if fn is not None or str(loss_type) not in BOX_REG_LOSS_REGISTRY:
        return fn

    def libraghm_per_roi(box_predictor, proposal_boxes, gt_boxes, pred_deltas):
        target = box_predictor.box2box_transform.get_deltas(proposal_boxes, gt_boxes)
        # the type object (a BoxRegLossType) carries the configured parameters
        return box_reg_loss_elementwise(loss_type, pred_deltas, target).sum(dim=1)

    return libraghm_per_roi


def _rank_within_groups(order: torch.Tensor, groups: torch.Tensor, num_groups: int):
    """
    Rank elements within their group, keeping the relative order given by ``order``.

    Args:
        order (Tensor[M]): indices of elements, best first.
        groups (Tensor[N]): group id in [0, num_groups) of every element.
        num_groups (int): number of groups.

    Returns:
        Tensor[M]: ``order`` regrouped by group id (stable, so best first within a group).
        Tensor[M]: the group id of each entry of the first output.
        Tensor[M]: the rank (0 = best) of each entry within its group.
    """
    g = groups[order]
    g_sorted, perm = torch.sort(g, stable=True)
    order = order[perm]
    counts = torch.bincount(g_sorted, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=order.device) - starts[g_sorted]
    return order, g_sorted, rank


def ohem_select_paper(
    losses: torch.Tensor,
    boxes: torch.Tensor,
    image_ids: torch.Tensor,
    num_images: int,
    batch_size_per_image: int,
    nms_thresh: float,
) -> torch.Tensor:
    """
    The paper's hard-example selection: NMS over the loss-ranked RoIs of each image, then the
    ``batch_size_per_image`` RoIs with the largest loss per image, whatever their label.

    Args:
        losses (Tensor[R]): per-RoI loss (classification + box regression) of all candidates.
        boxes (Tensor[R, 4]): candidate RoI boxes (XYXY).
        image_ids (Tensor[R]): image index in [0, num_images) of each candidate.
        num_images (int): number of images in the batch.
        batch_size_per_image (int): B, the number of RoIs kept per image at most.
        nms_thresh (float): IoU above which a lower-loss RoI is suppressed by a higher-loss one
            of the same image; ``>= 1`` turns NMS off (no IoU exceeds 1).

    Returns:
        Tensor[M]: indices of the selected candidates, grouped by image, largest loss first.
    """
    if nms_thresh < 1.0:
        order = batched_nms(boxes, losses.float(), image_ids, nms_thresh)
    else:
        order = torch.sort(losses, descending=True, stable=True)[1]
    order, _, rank = _rank_within_groups(order, image_ids, num_images)
    return order[rank < batch_size_per_image]


def ohem_select_mmdet(
    losses: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    num_images: int,
    batch_size_per_image: int,
    positive_fraction: float,
    num_classes: int,
) -> torch.Tensor:
    """
    mmdetection-compatible selection: per image, the ``int(B * positive_fraction)`` positives with
    the largest loss (or all positives if fewer), then the negatives with the largest loss to fill
    ``B``. No NMS.

    Args:
        losses (Tensor[R]): per-RoI loss of all candidates (classification loss in this mode).
        labels (Tensor[R]): class labels in [0, num_classes]; ``num_classes`` is background.
        image_ids (Tensor[R]): image index in [0, num_images) of each candidate.
        num_images (int): number of images in the batch.
        batch_size_per_image (int): B, the number of RoIs kept per image at most.
        positive_fraction (float): the largest fraction of positives among the B.
        num_classes (int): number of foreground classes.

    Returns:
        Tensor[M]: indices of the selected candidates, grouped by image, positives first, each
        part largest loss first.
    """
    order = torch.sort(losses, descending=True, stable=True)[1]
    is_neg = (labels == num_classes).long()
    groups = image_ids * 2 + is_neg
    order, g, rank = _rank_within_groups(order, groups, 2 * num_images)
    pos_quota = int(batch_size_per_image * positive_fraction)
    num_pos = torch.bincount(image_ids[is_neg == 0], minlength=num_images).clamp(max=pos_quota)
    limit = torch.where(
        g % 2 == 0,
        torch.full_like(g, pos_quota),
        batch_size_per_image - num_pos[g // 2],
    )
    return order[rank < limit]


@contextlib.contextmanager
def _discarded_events():
    """Send the events logged inside the block to a throw-away EventStorage."""
    with EventStorage(get_event_storage().iter):
        yield


@ROI_HEADS_REGISTRY.register()
class OHEMROIHeads(StandardROIHeads):
    """
    :class:`StandardROIHeads` whose box head (and mask/keypoint heads, which use the box head's
    foreground RoIs) trains on the hardest candidate RoIs instead of a random sample.

    Overrides (Detectron2 methods):

    - ``ROIHeads._sample_proposals``: keep every labelled candidate (ignored RoIs, label -1, are
      dropped), so ``label_and_sample_proposals`` returns all candidates with their targets.
    - ``StandardROIHeads.forward`` (training only): label the candidates, pick the hard examples
      with :meth:`sample_hard_examples`, then train the box/mask/keypoint heads on them as the
      stock heads do. Inference is unchanged.
    """

    @configurable
    def __init__(
        self,
        *,
        ohem_mode: str = "paper",
        ohem_nms_thresh: float = 0.7,
        log_period: int = 0,
        **kwargs,
    ):
        """
        Args:
            ohem_mode (str): "paper" or "mmdet" (see the module docstring).
            ohem_nms_thresh (float): NMS IoU in [0, 1] over the loss-ranked RoIs in "paper"
                mode; 1.0 turns NMS off. Not used in "mmdet" mode.
            log_period (int): log the IoU histograms of the selected and of all negatives every
                this many iterations (0: never; see :mod:`libraghm.events`).
            kwargs: the arguments of :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        if ohem_mode not in OHEM_MODES:
            raise ValueError(
                f"LIBRAGHM.OHEM.MODE={ohem_mode!r} is not valid; valid values: {OHEM_MODES}."
            )
        if (
            isinstance(ohem_nms_thresh, bool)
            or not isinstance(ohem_nms_thresh, (int, float))
            or not (0.0 <= float(ohem_nms_thresh) <= 1.0)
        ):
            raise ValueError(
                f"LIBRAGHM.OHEM.NMS_THRESH={ohem_nms_thresh!r} is not valid; it must be a number "
                "in [0, 1] (1.0 turns the NMS off)."
            )
        if not (isinstance(self.batch_size_per_image, int) and self.batch_size_per_image > 0):
            raise ValueError(
                f"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE={self.batch_size_per_image!r} is not valid "
                "for OHEMROIHeads; it must be a positive integer (B, the RoIs kept per image)."
            )
        if ohem_mode == "mmdet" and not (0.0 <= float(self.positive_fraction) <= 1.0):
            raise ValueError(
                f"MODEL.ROI_HEADS.POSITIVE_FRACTION={self.positive_fraction!r} is not valid for "
                "LIBRAGHM.OHEM.MODE='mmdet'; it must be in [0, 1]."
            )
        reg_type = getattr(self.box_predictor, "box_reg_loss_type", None)
        if ohem_mode == "paper" and _per_roi_box_reg_loss_fn(reg_type) is None:
            valid = sorted(OHEM_BOX_REG_LOSSES) + sorted(BOX_REG_LOSS_REGISTRY)
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE={str(reg_type)!r} has no per-RoI version "
                f"for OHEM's ranking (LIBRAGHM.OHEM.MODE='paper'); valid values: {valid} (add "
                "one with libraghm.modeling.ohem_roi_heads.register_ohem_box_reg_loss)."
            )
        self.ohem_mode = ohem_mode
        self.ohem_nms_thresh = float(ohem_nms_thresh)
        self.log_period = checked_log_period(log_period)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["ohem_mode"] = cfg.LIBRAGHM.OHEM.MODE
        ret["ohem_nms_thresh"] = cfg.LIBRAGHM.OHEM.NMS_THRESH
        ret["log_period"] = cfg.LIBRAGHM.LOG_PERIOD
        return ret

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        """
        Overrides ``ROIHeads._sample_proposals``: label the candidates as Detectron2 does (matched
        class, background = ``num_classes`` for matcher label 0, -1 for ignored) and keep all of
        them except the ignored ones; OHEM picks among them later.

        Args:
            matched_idxs (Tensor[N]): best-matched GT index of each proposal.
            matched_labels (Tensor[N]): matcher label (0 background, 1 foreground, -1 ignore).
            gt_classes (Tensor[M]): GT classes of the image.

        Returns:
            Tensor: indices of the kept proposals. Tensor: their labels in [0, num_classes].
        """
        if gt_classes.numel() > 0:
            labels = gt_classes[matched_idxs]
            labels[matched_labels == 0] = self.num_classes
            labels[matched_labels == -1] = -1
        else:
            labels = torch.full_like(matched_idxs, self.num_classes)
        keep = torch.nonzero(labels >= 0).squeeze(1)
        return keep, labels[keep]

    def forward(self, images, features, proposals, targets=None):
        """
        Overrides ``StandardROIHeads.forward`` in training (inference is the stock one): OHEM
        replaces the random subsampling of ``label_and_sample_proposals``.

        Args/Returns: as :meth:`detectron2.modeling.ROIHeads.forward`. In training the returned
        proposals are the OHEM-selected RoIs with their targets.
        """
        if not self.training:
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

    def per_roi_losses(self, predictions, candidates: List[Instances]) -> Dict[str, torch.Tensor]:
        """
        Per-RoI classification and box-regression losses, consistent with the box predictor's
        losses (``FastRCNNOutputLayers.losses``): softmax cross-entropy (or the sum of sigmoid
        binary cross-entropies with ``USE_SIGMOID_CE``) and the regression loss of
        ``BBOX_REG_LOSS_TYPE`` for foreground RoIs (0 for background ones), each times its loss
        weight. Their sum over the RoIs divided by R equals the box predictor's summed losses.
        In "mmdet" mode the ranking uses the classification loss only, and the regression loss
        is not computed (returned as zeros).

        Args:
            predictions (tuple[Tensor, Tensor]): box predictor outputs (scores, deltas) for the
                concatenated candidates.
            candidates (list[Instances]): per image, the candidates with "proposal_boxes",
                "gt_classes" (in [0, num_classes]) and, for images with GT, "gt_boxes".

        Returns:
            dict[str, Tensor[R]]: "loss_cls" and "loss_box_reg" of every candidate.
        """
        scores, deltas = predictions
        scores = scores.float()
        labels = cat([c.gt_classes for c in candidates], dim=0)
        bp = self.box_predictor
        if getattr(bp, "use_sigmoid_ce", False):
            target = F.one_hot(labels, self.num_classes + 1)[:, : self.num_classes].to(scores)
            loss_cls = F.binary_cross_entropy_with_logits(
                scores[:, : self.num_classes], target, reduction="none"
            ).sum(dim=1)
        else:
            loss_cls = F.cross_entropy(scores, labels, reduction="none")
        loss_reg = torch.zeros_like(loss_cls)
        fg = torch.nonzero(labels < self.num_classes).squeeze(1)
        if self.ohem_mode == "paper" and fg.numel() > 0:
            proposal_boxes = cat([c.proposal_boxes.tensor for c in candidates], dim=0)[fg]
            gt_boxes = cat(
                [
                    (c.gt_boxes if c.has("gt_boxes") else c.proposal_boxes).tensor
                    for c in candidates
                ],
                dim=0,
            )[fg]
            box_dim = proposal_boxes.shape[1]
            if deltas.shape[1] == box_dim:  # class-agnostic regression
                fg_deltas = deltas[fg]
            else:
                fg_deltas = deltas.view(len(labels), -1, box_dim)[fg, labels[fg]]
            reg_fn = _per_roi_box_reg_loss_fn(bp.box_reg_loss_type)
            loss_reg[fg] = reg_fn(bp, proposal_boxes, gt_boxes, fg_deltas.float()).to(loss_reg)
        weights = getattr(bp, "loss_weight", {})
        return {
            "loss_cls": loss_cls * weights.get("loss_cls", 1.0),
            "loss_box_reg": loss_reg * weights.get("loss_box_reg", 1.0),
        }

    @torch.no_grad()
    def hard_example_indices(
        self, features: Dict[str, torch.Tensor], candidates: List[Instances]
    ) -> List[torch.Tensor]:
        """
        Run the read-only box head once over the candidates of all images, rank them by loss and
        pick the hard examples.

        Args:
            features (dict[str, Tensor]): the ROI heads' input features.
            candidates (list[Instances]): per image, all labelled candidates (the output of
                ``label_and_sample_proposals``).

        Returns:
            list[Tensor]: per image, the indices into its candidates of the selected RoIs,
            largest loss first ("mmdet" mode: positives first).
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
        losses = self.per_roi_losses(predictions, candidates)
        if self.ohem_mode == "paper":
            boxes = cat([c.proposal_boxes.tensor for c in candidates], dim=0)
            keep = ohem_select_paper(
                losses["loss_cls"] + losses["loss_box_reg"],
                boxes,
                image_ids,
                num_images,
                self.batch_size_per_image,
                self.ohem_nms_thresh,
            )
        else:
            keep = ohem_select_mmdet(
                losses["loss_cls"],
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
        Select the OHEM training RoIs of every image and log their fg/bg counts.

        Args:
            features (dict[str, Tensor]): the ROI heads' input features.
            candidates (list[Instances]): per image, all labelled candidates.

        Returns:
            list[Instances]: per image, the selected candidates (all their fields).
        """
        indices = self.hard_example_indices(features, candidates)
        selected = [c[i] for c, i in zip(candidates, indices)]
        num_fg = [int((s.gt_classes < self.num_classes).sum()) for s in selected]
        storage = get_event_storage()
        storage.put_scalar("roi_head/num_fg_samples", sum(num_fg) / max(len(selected), 1))
        storage.put_scalar(
            "roi_head/num_bg_samples",
            sum(len(s) - f for s, f in zip(selected, num_fg)) / max(len(selected), 1),
        )
        storage.put_scalar(
            "roi_head/ohem_num_candidates",
            sum(len(c) for c in candidates) / max(len(candidates), 1),
        )
        if storage_to_log(self.log_period) is not None:
            # The hard negatives (Libra R-CNN's figure 2) and the population they came from.
            hist = "roi_head/neg_iou_hist"
            log_negative_iou_histogram(storage, hist, negative_ious(selected, self.num_classes))
            cand = negative_ious(candidates, self.num_classes)
            log_negative_iou_histogram(storage, "roi_head/cand_neg_iou_hist", cand)
        return selected
