"""Instance-balanced positive sampling (Libra R-CNN, sample level).

Positives are shared out evenly between the ground-truth boxes they are matched to: every
box gets the same quota, a box with fewer positives gives all of them, and the shortfall is
refilled, again evenly, from the other boxes' remaining positives. The quota is met exactly
and no positive is sampled twice (mmdetection's InstanceBalancedPosSampler removes
duplicates by tensor identity, which removes nothing).
"""
import torch

from .base import Sampler, shuffle_unless_trivial, split_candidates, take_smallest_keys
from .grouped_ranking import water_filling_keys
from .registry import SAMPLER_REGISTRY

__all__ = ["sample_instance_balanced", "sample_uniform", "InstanceBalancedSampler"]


@torch.jit.script
def sample_uniform(candidates: torch.Tensor, num: int) -> torch.Tensor:
    """
    Draw ``num`` of ``candidates`` uniformly without replacement.

    Args:
        candidates (Tensor[int64]): (n,) indices.
        num (int): how many to draw, ``<= n``.

    Returns:
        Tensor[int64]: (num,) the drawn indices.
    """
    perm = torch.randperm(candidates.numel(), device=candidates.device)
    return candidates.index_select(0, perm[:num])


@torch.jit.script
def sample_instance_balanced(
    positives: torch.Tensor, num: int, gt_index: torch.Tensor, num_gt: int
) -> torch.Tensor:
    """
    Draw ``num`` positives, as evenly as possible per matched ground-truth box.

    Every box gets ``num // B`` positives or one more (``B`` boxes with positives), boxes with
    fewer positives give all of theirs and the others share the shortfall evenly; which boxes
    get the one extra is random, and so is the choice within a box.

    Args:
        positives (Tensor[int64]): (n,) indices of the positive candidates.
        num (int): how many to draw, ``<= n``.
        gt_index (Tensor[int64]): (N,) matched ground-truth index of every candidate.
        num_gt (int): number of ground-truth boxes (``> 0`` when there are positives).

    Returns:
        Tensor[int64]: (num,) distinct positive indices.
    """
    positives, trivial = shuffle_unless_trivial(positives, num)
    if trivial:
        return positives
    # Relabel the boxes in a random order: ties between boxes go to a random subset of boxes.
    box = torch.randperm(num_gt, device=positives.device).index_select(
        0, gt_index.index_select(0, positives)
    )
    return take_smallest_keys(positives, water_filling_keys(box, num_gt), num)


@SAMPLER_REGISTRY.register()
class InstanceBalancedSampler(Sampler):
    """
    Instance-balanced positives (see :func:`sample_instance_balanced`), uniformly random
    negatives. Needs each candidate's matched ground truth.
    """

    needs_match_quality = True

    def __call__(self, labels, num_samples, positive_fraction, bg_label, *, ious=None,
                 gt_index=None, num_gt=0):
        """
        See :meth:`Sampler.__call__`; ``gt_index`` and ``num_gt`` are required, ``ious`` unused.
        """
        if gt_index is None:
            raise ValueError("InstanceBalancedSampler needs gt_index (each candidate's matched GT)")
        positive, negative, num_pos, num_neg = split_candidates(
            labels, num_samples, positive_fraction, bg_label
        )
        pos = sample_instance_balanced(positive, num_pos, gt_index, num_gt)
        return pos, sample_uniform(negative, num_neg)

    def __repr__(self):
        return "InstanceBalancedSampler()"
