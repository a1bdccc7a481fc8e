"""The sampler interface shared by every LibraGHM sampler, and the split of the quota.

A sampler plays the role of Detectron2's :func:`detectron2.modeling.sampling.subsample_labels`:
given the labels of N candidates it returns the indices of the positives and of the negatives
used for training. Samplers that balance by IoU or by ground-truth instance also receive, per
candidate, its best IoU with any ground truth and the index of its matched ground truth.
"""
from typing import Optional, Tuple

import torch

__all__ = ["Sampler", "split_candidates", "shuffle_unless_trivial", "take_smallest_keys"]


@torch.jit.script
def split_candidates(
    labels: torch.Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """
    Find the positive and negative candidates and how many of each to sample.

    The quota follows Detectron2's ``subsample_labels``: at most
    ``int(num_samples * positive_fraction)`` positives, negatives fill the rest of
    ``num_samples``, and each count is capped by what is available.

    Args:
        labels (Tensor[int]): (N,) labels; -1 = ignore, ``bg_label`` = negative, anything
            else = positive.
        num_samples (int): total number of candidates to sample.
        positive_fraction (float): largest fraction of positives in the sample.
        bg_label (int): the label of negatives.

    Returns:
        Tensor[int64]: (P,) indices of all positive candidates, ascending.
        Tensor[int64]: (Q,) indices of all negative candidates, ascending.
        int: number of positives to sample, ``min(P, int(num_samples * positive_fraction))``.
        int: number of negatives to sample, ``min(Q, num_samples - positives sampled)``.
    """
    # One host synchronisation each (the output sizes are data-dependent), as in
    # subsample_labels; everything after this works on device tensors only.
    negative_mask = labels == bg_label
    if bg_label == -1:
        positive_mask = labels != -1
    else:  # not ignored and not negative (one operation fewer than two comparisons and an and)
        positive_mask = (labels != -1).logical_xor_(negative_mask)
    positive = torch.nonzero(positive_mask).squeeze(1)
    negative = torch.nonzero(negative_mask).squeeze(1)
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    return positive, negative, num_pos, num_neg


@torch.jit.script
def shuffle_unless_trivial(candidates: torch.Tensor, num: int) -> Tuple[torch.Tensor, bool]:
    """
    The opening of every balanced draw of ``num`` of ``candidates``: the trivial cases need no
    randomness, the others start from the candidates in a random order (so that ties between
    equal keys in :func:`take_smallest_keys` are broken at random).

    Args:
        candidates (Tensor[int64]): (n,) indices.
        num (int): how many will be drawn.

    Returns:
        Tensor[int64]: all candidates if ``num >= n``, none if ``num <= 0``, else all of them in a
        random order.
        bool: True in the two trivial cases (the tensor is then the final draw).
    """
    n = candidates.numel()
    if num >= n:
        return candidates, True
    if num <= 0:
        return candidates[:0], True
    return candidates.index_select(0, torch.randperm(n, device=candidates.device)), False


@torch.jit.script
def take_smallest_keys(candidates: torch.Tensor, keys: torch.Tensor, num: int) -> torch.Tensor:
    """
    Args:
        candidates (Tensor[int64]): (n,) indices.
        keys (Tensor): (n,) sort key of each candidate.
        num (int): how many to take, ``<= n``.

    Returns:
        Tensor[int64]: (num,) the candidates with the ``num`` smallest keys, in no particular order.
    """
    return candidates.index_select(0, torch.topk(keys, num, largest=False, sorted=False)[1])


class Sampler:
    """
    Interface of a sampler. Subclasses implement :meth:`__call__` (and ``from_config`` when they
    have parameters) and are registered in :data:`libraghm.sampling.SAMPLER_REGISTRY`.

    Attributes:
        needs_match_quality (bool): True when :meth:`__call__` needs ``ious``, ``gt_index`` and
            ``num_gt``; the heads then record them from their matcher
            (:class:`libraghm.sampling.IoURecordingMatcher`).
        mines_hard_examples (bool): True for samplers that choose among the labelled candidates
            by their loss (OHEM): :meth:`__call__` keeps candidates, and the ROI heads then call
            :meth:`select_hard_examples` with the box head's per-RoI losses.
    """

    needs_match_quality = False
    mines_hard_examples = False

    @classmethod
    def from_config(cls, cfg, head_key: str):
        """
        Build the sampler from the config, validating every value it reads. This default suits
        samplers with no parameter of their own.

        Args:
            cfg (CfgNode): the model config.
            head_key (str): the sampling head's node, "MODEL.ROI_HEADS" or "MODEL.RPN".

        Returns:
            Sampler: the sampler.
        """
        return cls()

    def __call__(
        self,
        labels: torch.Tensor,
        num_samples: int,
        positive_fraction: float,
        bg_label: int,
        *,
        ious: Optional[torch.Tensor] = None,
        gt_index: Optional[torch.Tensor] = None,
        num_gt: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Sample positives and negatives.

        Args:
            labels (Tensor[int]): (N,) candidate labels: -1 ignore, ``bg_label`` negative,
                anything else positive.
            num_samples (int): total number of candidates to return (or fewer if not enough).
            positive_fraction (float): largest fraction of positives among them.
            bg_label (int): label of the negatives.
            ious (Tensor[float], optional): (N,) each candidate's largest IoU with any ground
                truth (zeros when the image has none).
            gt_index (Tensor[int64], optional): (N,) index of the ground truth each candidate is
                matched to (meaningful for positives).
            num_gt (int): number of ground-truth boxes in the image.

        Returns:
            Tensor[int64]: indices of the sampled positives (no duplicates).
            Tensor[int64]: indices of the sampled negatives (no duplicates).
        """
        raise NotImplementedError

    def sample_proposals(self, labels: torch.Tensor, num_samples: int, positive_fraction: float,
                         bg_label: int, **match_quality) -> torch.Tensor:
        """
        The ROI heads' form of :meth:`__call__`: one index tensor, positives first (as
        Detectron2's ``ROIHeads._sample_proposals``).

        Args: as :meth:`__call__`.

        Returns:
            Tensor[int64]: indices of the sampled candidates.
        """
        pos, neg = self(labels, num_samples, positive_fraction, bg_label, **match_quality)
        return torch.cat([pos, neg], dim=0)
