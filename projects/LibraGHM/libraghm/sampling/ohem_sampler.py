"""Online hard example mining (OHEM) as a sampler of the ROI heads.

Shrivastava, Gupta and Girshick, "Training Region-based Object Detectors with Online Hard Example
Mining", CVPR 2016. Instead of sampling the RoIs that train the box head at random, a read-only
pass of the box head scores *all* candidate RoIs of the batch, and the RoIs with the largest loss
("hard examples") are the ones trained on. The ROI heads (:class:`LibraGHMROIHeads`) run that
pass - the box predictor's own losses per RoI, through the same loss objects the head trains
with - and hand the losses to :meth:`OHEMSampler.select_hard_examples`.

Two modes (``MODEL.ROI_HEADS.OHEM.MODE``):

- ``"paper"`` (default): rank every candidate by classification + box-regression loss, suppress
  duplicates by NMS over the loss-ranked RoI boxes (IoU ``NMS_THRESH``, 0.7; 1.0 turns NMS off),
  keep the top ``B = MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE`` RoIs per image regardless of label.
- ``"mmdet"``: mmdetection's ``OHEMSampler``: rank by classification loss only, no NMS, keep the
  positive quota of ``MODEL.ROI_HEADS.POSITIVE_FRACTION`` (hardest positives up to
  ``int(B * POSITIVE_FRACTION)``, hardest negatives for the rest of ``B``).

The selection (NMS with the image index as the NMS group, ranking within image) is vectorised.
"""
import torch

from detectron2.layers import batched_nms

from ..validation import Float, OneOf, check_params, read_params
from .grouped_ranking import rank_within_groups
from .no_sampling import NoSampling
from .registry import SAMPLER_REGISTRY

__all__ = ["OHEMSampler", "ohem_select_paper", "ohem_select_mmdet"]


def _top_per_group(order, groups, num_groups, limit):
    """
    Entries of ``order`` (best first) whose rank within their group is below the group's limit,
    grouped by group id (stable: best first within a group).
    """
    g = groups.index_select(0, order)
    rank = rank_within_groups(g, num_groups)[0]
    keep = order[rank < limit.index_select(0, g)]
    return keep[torch.sort(groups.index_select(0, keep), stable=True)[1]]


def ohem_select_paper(losses, boxes, image_ids, num_images, batch_size_per_image, nms_thresh):
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
            of the same image; ``>= 1`` turns NMS off.

    Returns:
        Tensor[M]: indices of the selected candidates, grouped by image, largest loss first.
    """
    if nms_thresh < 1.0:
        order = batched_nms(boxes, losses.float(), image_ids, nms_thresh)
    else:
        order = torch.sort(losses, descending=True, stable=True)[1]
    limit = torch.full((num_images,), batch_size_per_image, device=losses.device)
    return _top_per_group(order, image_ids, num_images, limit)


def ohem_select_mmdet(losses, labels, image_ids, num_images, batch_size_per_image,
                      positive_fraction, num_classes):
    """
    mmdetection-compatible selection: per image, the ``int(B * positive_fraction)`` positives with
    the largest loss (or all positives if fewer), then the negatives with the largest loss to fill
    ``B``. No NMS.

    Args:
        losses (Tensor[R]): per-RoI classification loss of all candidates.
        labels (Tensor[R]): class labels in [0, num_classes]; ``num_classes`` is background.
        image_ids (Tensor[R]): image index in [0, num_images) of each candidate.
        num_images (int): number of images in the batch.
        batch_size_per_image (int): B.
        positive_fraction (float): the largest fraction of positives among the B.
        num_classes (int): number of foreground classes.

    Returns:
        Tensor[M]: indices of the selected candidates, grouped by image, positives first, each
        part largest loss first.
    """
    order = torch.sort(losses, descending=True, stable=True)[1]
    is_neg = (labels == num_classes).long()
    groups = image_ids * 2 + is_neg
    pos_quota = int(batch_size_per_image * positive_fraction)
    num_pos = torch.zeros(num_images, dtype=torch.long, device=losses.device)
    num_pos.scatter_add_(0, image_ids, 1 - is_neg)
    limit = torch.stack(
        [torch.full_like(num_pos, pos_quota), batch_size_per_image - num_pos.clamp(max=pos_quota)],
        dim=1,
    ).reshape(-1)
    return _top_per_group(order, groups, 2 * num_images, limit)


@SAMPLER_REGISTRY.register()
class OHEMSampler(NoSampling):
    """
    OHEM (see the module docstring). As a label-based sampler it keeps every labelled candidate
    (:class:`NoSampling`); the choice is :meth:`select_hard_examples`.
    """

    mines_hard_examples = True
    #: Valid values of the arguments (and of the MODEL.ROI_HEADS.OHEM keys).
    PARAMS = {"mode": OneOf("paper", "mmdet"), "nms_thresh": Float(0.0, 1.0)}

    def __init__(self, mode: str = "paper", nms_thresh: float = 0.7):
        """
        Args:
            mode (str): "paper" or "mmdet".
            nms_thresh (float): NMS IoU in [0, 1] in "paper" mode (1.0: no NMS).
        """
        args = check_params(self.PARAMS, mode=mode, nms_thresh=nms_thresh)
        self.mode = mode
        self.nms_thresh = args["nms_thresh"]

    @classmethod
    def from_config(cls, cfg, head_key):
        """Reads ``<head_key>.OHEM`` (MODE, NMS_THRESH)."""
        return cls(**read_params(cfg, f"{head_key}.OHEM", cls.PARAMS))

    @property
    def uses_box_loss(self) -> bool:
        """Whether the ranking needs the box-regression loss (paper mode)."""
        return self.mode == "paper"

    def select_hard_examples(self, loss_cls, loss_box_reg, boxes, labels, image_ids, num_images,
                             batch_size_per_image, positive_fraction, num_classes):
        """
        Args:
            loss_cls, loss_box_reg (Tensor[R]): per-RoI losses of all candidates of the batch
                (``loss_box_reg`` is only read in paper mode).
            boxes (Tensor[R, 4]): the candidates' boxes.
            labels (Tensor[R]): their classes in [0, num_classes] (num_classes = background).
            image_ids (Tensor[R]): their image index.
            num_images, batch_size_per_image, positive_fraction, num_classes: the head's.

        Returns:
            Tensor[M]: indices of the hard examples, grouped by image.
        """
        if self.mode == "paper":
            return ohem_select_paper(loss_cls + loss_box_reg, boxes, image_ids, num_images,
                                     batch_size_per_image, self.nms_thresh)
        return ohem_select_mmdet(loss_cls, labels, image_ids, num_images, batch_size_per_image,
                                 positive_fraction, num_classes)

    def __repr__(self):
        return f"OHEMSampler(mode={self.mode!r}, nms_thresh={self.nms_thresh})"
