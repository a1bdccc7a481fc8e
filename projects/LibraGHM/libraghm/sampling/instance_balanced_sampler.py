"""Instance-balanced positive sampling (Libra R-CNN, sample level).

Positives are shared out evenly between the ground-truth boxes they are matched to: every
box gets the same quota, a box with fewer positives gives all of them, and the shortfall is
refilled, again evenly, from the other boxes' remaining positives. The quota is met exactly
and no positive is sampled twice (mmdetection's InstanceBalancedPosSampler removes
duplicates by tensor identity, which removes nothing).
"""
from typing import Tuple

import torch

from .base import Sampler, shuffle_unless_trivial, split_candidates, take_smallest_keys
from .grouped_ranking import CounterTable, counter_table, counts_so_far
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
def _sample_instance_balanced(positives: torch.Tensor, num: int, gt_index: torch.Tensor,
                              num_gt: int, words: int, table: CounterTable,
                              field_mask: torch.Tensor) -> torch.Tensor:
    """:func:`sample_instance_balanced` with the ranking's counter layout given."""
    positives, trivial = shuffle_unless_trivial(positives, num)
    if trivial:
        return positives
    # Relabel the boxes in a random order: ties between boxes go to a random subset of boxes.
    box = torch.randperm(num_gt, device=positives.device).index_select(
        0, gt_index.index_select(0, positives)
    )
    # Water-filling keys (rank within box, box): see grouped_ranking.water_filling_keys.
    keys = torch.add(box, counts_so_far(box, words, table, field_mask), alpha=num_gt)
    return take_smallest_keys(positives, keys, num)


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
    return _sample_instance_balanced(
        positives, num, gt_index, num_gt,
        *counter_table(num_gt, positives.numel(), positives.device)
    )


@torch.jit.script
def _instance_balanced_sample(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                              bg_label: int, gt_index: torch.Tensor, num_gt: int, words: int,
                              table: CounterTable,
                              field_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:class:`InstanceBalancedSampler` in one compiled call (counter layout for ``num_gt``)."""
    positive, negative, num_pos, num_neg = split_candidates(
        labels, num_samples, positive_fraction, bg_label
    )
    positive = _sample_instance_balanced(positive, num_pos, gt_index, num_gt, words, table,
                                         field_mask)
    return positive, sample_uniform(negative, num_neg)


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
        return _instance_balanced_sample(
            labels, num_samples, positive_fraction, bg_label, gt_index, num_gt,
            *counter_table(num_gt, labels.numel(), labels.device)
        )

    def __repr__(self):
        return "InstanceBalancedSampler()"
