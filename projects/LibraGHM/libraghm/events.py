"""What LibraGHM logs to Detectron2's EventStorage during training.

Besides the losses, the LibraGHM parts log the statistics their papers plot, as raw (unsmoothed)
scalars that Detectron2's JSONWriter (``metrics.json``) and TensorboardXWriter pick up:

- ``roi_head/neg_iou_hist/<lo>-<hi>``: fraction of the sampled negative RoIs whose IoU with their
  best ground truth lies in ``[lo, hi)`` (``roi_head/cand_neg_iou_hist/...``: of all negative
  candidates, where the heads see them all, i.e. OHEM). Libra R-CNN, figure 2.
- ``<loss>/g_hist/<k>``: fraction of the samples whose gradient norm ``g`` falls into bin ``k`` of
  ``bins`` equal bins on [0, 1], ``<loss>/num_samples`` their number, and ``<loss>/beta/<k>``:
  GHM's harmonizing weight of the bin (GHM, figures 1 and 2).
- ``bifpn/<layer>/<node>/w<i>``: the normalised fusion weight of input ``i`` of a BiFPN node.
- ``<loss>/top_scores_near_half``: of every image's 100 highest classification scores, the share
  within [0.4, 0.6]; when it reaches 0.9 a warning is logged (GHM-C's collapse, see docs/ghm.md).

They are logged every ``LIBRAGHM.LOG_PERIOD`` iterations (0: never), so the other iterations make
no host synchronisation for them.
"""
import logging
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from detectron2.structures import Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import EventStorage, get_event_storage

from .validation import Int

__all__ = ["NEG_IOU_EDGES", "checked_log_period", "storage_to_log", "put_fractions",
           "negative_ious", "log_negative_iou_histogram", "gradient_norm_histogram",
           "log_gradient_norms", "top_scores_near_half", "log_score_collapse"]

logger = logging.getLogger(__name__)

# Libra R-CNN's figure 2 bins the IoU of negatives in steps of 0.05 over [0, 0.5).
NEG_IOU_EDGES = [round(0.05 * i, 2) for i in range(11)]


def checked_log_period(period, name: str = "log_period") -> int:
    """
    Args:
        period: log LibraGHM's statistics every this many iterations (0 = never).
        name (str): the argument or config key (``LIBRAGHM.LOG_PERIOD``), for the error message.

    Returns:
        int: the period, validated: an integer >= 0.
    """
    return Int(low=0).check(period, name)


def storage_to_log(period: int) -> Optional[EventStorage]:
    """
    Args:
        period (int): log every ``period`` iterations; 0 or less: never.

    Returns:
        EventStorage or None: the current storage when one exists and its iteration is a multiple
        of ``period``, else None.
    """
    if period <= 0:
        return None
    try:
        storage = get_event_storage()
    except AssertionError:  # no EventStorage open (inference, or a model used outside a trainer)
        return None
    return storage if storage.iter % period == 0 else None


def put_fractions(storage: EventStorage, prefix: str, counts: torch.Tensor, names: Iterable[str]):
    """
    Put ``counts / counts.sum()`` as one raw scalar per bin, ``<prefix>/<name>``.

    Args:
        storage (EventStorage): where to log.
        prefix (str): scalar name prefix.
        counts (Tensor): (K,) non-negative counts (all zero: every fraction is logged as 0).
        names (iterable[str]): K bin names.
    """
    counts = counts.detach().to(torch.float64)
    fractions = (counts / counts.sum().clamp_min(1e-12)).tolist()  # one host sync
    storage.put_scalars(
        smoothing_hint=False, **{f"{prefix}/{n}": v for n, v in zip(names, fractions)}
    )


def negative_ious(instances: List[Instances], bg_label: int) -> torch.Tensor:
    """
    IoU of every negative RoI with its best-matching ground truth.

    Args:
        instances (list[Instances]): per image, labelled RoIs (``proposal_boxes``, ``gt_classes``
            and, in images with ground truth, ``gt_boxes``: the box each RoI was matched to,
            which is its largest-IoU ground truth), as ``label_and_sample_proposals`` returns.
        bg_label (int): the background class (``num_classes``).

    Returns:
        Tensor: (R,) the IoUs of the negatives of all images (0 in images without ground truth).
        Degenerate boxes give what Detectron2's ``matched_pairwise_iou`` gives, e.g. NaN (0/0) for
        a zero-area RoI matched to a zero-area ground truth; :func:`log_negative_iou_histogram`
        counts such values as 0.
    """
    out = []
    for inst in instances:
        neg = inst.gt_classes == bg_label
        if inst.has("gt_boxes"):
            out.append(matched_pairwise_iou(inst.proposal_boxes[neg], inst.gt_boxes[neg]))
        else:
            out.append(inst.gt_classes.new_zeros(int(neg.sum()), dtype=torch.float32))
    return torch.cat(out) if out else torch.zeros(0)


def log_negative_iou_histogram(storage: EventStorage, name: str, ious: torch.Tensor):
    """
    Log the fraction of negatives per IoU bin of :data:`NEG_IOU_EDGES` (IoUs of 0.5 and above,
    possible with non-default thresholds, count in the last bin), and the same IoUs as a
    TensorBoard histogram. Never raises and never logs NaN: a non-finite IoU (a zero-area RoI
    matched to a zero-area ground truth gives 0/0) counts as 0, and IoUs (also those of inverted
    boxes) are clamped to [0, 1] before binning.

    Args:
        storage (EventStorage): where to log.
        name (str): e.g. "roi_head/neg_iou_hist".
        ious (Tensor): (R,) IoUs of the negatives.
    """
    edges = NEG_IOU_EDGES
    k = len(edges) - 1
    ious = ious.detach().float()
    ious = torch.where(torch.isfinite(ious), ious, torch.zeros_like(ious)).clamp_(0.0, 1.0)
    idx = (ious / edges[1]).to(torch.int64).clamp_(0, k - 1)
    counts = torch.bincount(idx, minlength=k)
    names = [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(edges[:-1], edges[1:])]
    put_fractions(storage, name, counts, names)
    if ious.numel() > 0:
        storage.put_histogram(name, ious, bins=k)


def gradient_norm_histogram(g: torch.Tensor, keep: Optional[torch.Tensor],
                            bins: int) -> torch.Tensor:
    """
    Args:
        g (Tensor): gradient norms in [0, 1].
        keep (Tensor[bool] or None): samples to count (broadcastable to ``g``); None: all.
        bins (int): number of equal bins on [0, 1] (g = 1 counts in the last one).

    Returns:
        Tensor[float64]: (bins,) number of kept samples per bin. Non-finite norms (from NaN/Inf
        predictions) are not counted, as GHM's default "skip" policy leaves them out.
    """
    g = g.detach().float()
    finite = torch.isfinite(g)
    keep = finite if keep is None else finite & keep
    idx = (torch.where(finite, g, torch.zeros_like(g)) * bins).to(torch.int64).clamp_(0, bins - 1)
    idx = idx[torch.broadcast_to(keep, idx.shape)]
    return torch.bincount(idx.reshape(-1), minlength=bins).to(torch.float64)


@torch.no_grad()
def log_gradient_norms(storage: EventStorage, name: str, g: torch.Tensor,
                       keep: Optional[torch.Tensor], bins: int, harmonizer=None):
    """
    Log the fraction of samples per gradient-norm bin (``<name>/g_hist/<k>``), their number
    (``<name>/num_samples``; fraction x number = the bin's count) and, for a GHM loss, each bin's
    harmonizing weight (``<name>/beta/<k>``, from its last call; not logged in per-level mode,
    where that call saw one level only).

    Args:
        storage (EventStorage): where to log.
        name (str): e.g. "ghm_c".
        g (Tensor): gradient norms in [0, 1] (see :func:`gradient_norm_histogram`).
        keep (Tensor[bool] or None): samples to count; None: all.
        bins (int): number of equal bins on [0, 1].
        harmonizer (GradientHarmonizer or None): the GHM loss that just ran on these samples.
    """
    counts = gradient_norm_histogram(g, keep, bins)
    names = [f"{k:02d}" for k in range(bins)]
    put_fractions(storage, f"{name}/g_hist", counts, names)
    storage.put_scalar(f"{name}/num_samples", float(counts.sum()), smoothing_hint=False)
    if harmonizer is not None and not harmonizer.per_level:
        beta = harmonizer.last_bin_weights.double().tolist()
        storage.put_scalars(
            smoothing_hint=False, **{f"{name}/beta/{n}": v for n, v in zip(names, beta)}
        )


#: (storage, name) -> iteration of the last collapse warning: warnings are at least this far apart.
_LAST_COLLAPSE_WARNING: Dict[Tuple[int, str], int] = {}
COLLAPSE_WARNING_EVERY = 200


def top_scores_near_half(logits: torch.Tensor, valid: torch.Tensor, top_k: int = 100,
                         band: Tuple[float, float] = (0.4, 0.6)) -> float:
    """
    Args:
        logits (Tensor): (N, R, K) classification logits of N images.
        valid (Tensor[bool]): (N, R) anchors that are not ignored.
        top_k (int): scores per image to look at (the highest ones).
        band (float, float): the interval around 0.5.

    Returns:
        float: of the ``top_k`` highest sigmoid scores of every image (valid anchors only), the
        share that lies within ``band``; 0 when there are none. A detector whose best scores all sit
        near 0.5 has stopped telling objects from background however its loss looks.
    """
    scores = torch.sigmoid(logits.detach().float())
    scores = torch.where(valid.unsqueeze(-1), scores, torch.full_like(scores, -1.0))
    scores = scores.flatten(1)
    top = scores.topk(min(top_k, scores.shape[1]), dim=1).values
    counted = top >= 0
    near = counted & (top >= band[0]) & (top <= band[1])
    return float(near.sum()) / max(float(counted.sum()), 1.0)


def log_score_collapse(storage: EventStorage, name: str, logits: torch.Tensor, valid: torch.Tensor,
                       share: float = 0.9) -> float:
    """
    Log ``<name>/top_scores_near_half`` (:func:`top_scores_near_half`) and warn when it reaches
    ``share``: GHM-C's failure mode, in which every score settles near 0.5 while the loss looks
    fine. Warnings of one run and loss are at least ``COLLAPSE_WARNING_EVERY`` iterations apart.

    Returns:
        float: the logged share.
    """
    near = top_scores_near_half(logits, valid)
    storage.put_scalar(f"{name}/top_scores_near_half", near, smoothing_hint=False)
    key = (id(storage), name)
    last = _LAST_COLLAPSE_WARNING.get(key)
    if near >= share and (last is None or storage.iter - last >= COLLAPSE_WARNING_EVERY):
        _LAST_COLLAPSE_WARNING[key] = storage.iter
        logger.warning(
            f"Iteration {storage.iter}: {near:.0%} of the images' 100 highest {name} scores lie "
            "within [0.4, 0.6]: the classifier is collapsing to 0.5 (GHM-C's known failure mode; "
            "its detections will rank poorly). See docs/ghm.md (\"Why GHM RetinaNet scores "
            "everything near 0.5\") for the cause and what helps."
        )
    return near
