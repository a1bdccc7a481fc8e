"""IoU-balanced negative sampling (Libra R-CNN, arXiv 1904.02701, sample level).

Random sampling picks mostly easy negatives (IoU with every ground truth near 0). The
IoU-balanced sampler splits the negatives' IoU range into ``K`` equal bins and gives every bin
the same share of the negative quota, sampling uniformly inside a bin; bins with too few
negatives give all of theirs and the shortfall is refilled, evenly, from the other bins.
Positives are sampled instance-balanced (:mod:`.instance_balanced_sampler`) by default.

Everything runs as whole-tensor operations on the tensors' device (no numpy, no loop over
bins or boxes, no host synchronisation beyond the two ``nonzero`` calls that
``subsample_labels`` also makes); it is reproducible under ``torch.manual_seed``.

Layout of the code: each public function is a thin Python wrapper that looks up cached
constants (the counter layout of the ranking, :func:`.grouped_ranking.counter_table`, and
:func:`bin_constants`) and calls one compiled (TorchScript) function, ``_<name>``, that does the
work; the sampler makes one compiled call per image.
"""
import functools
from typing import Optional, Tuple

import torch

from .base import Sampler, shuffle_unless_trivial, split_candidates, take_smallest_keys
from .grouped_ranking import CounterTable, counter_table, counts_so_far
from .instance_balanced_sampler import (
    _sample_instance_balanced,
    sample_instance_balanced,
    sample_uniform,
)
from .registry import SAMPLER_REGISTRY
from ..validation import Bool, Float, Int, OneOf, check_params, read_params

__all__ = [
    "IoUBalancedSampler",
    "bin_constants",
    "iou_bins_highest_first",
    "sample_iou_balanced",
    "sample_iou_balanced_with_floor",
    "sample_iou_balanced_mmdet",
    "libra_sample",
]

_POSITIVE_MODES = ("instance_balanced", "random")

#: ``(1e-6, num_bins)`` as 0-dim CPU tensors, see :func:`bin_constants`.
BinConstants = Tuple[torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=64)
def bin_constants(num_bins: int, dtype: torch.dtype) -> Optional[BinConstants]:
    """
    The two numbers of the bin width, ``1e-6`` and ``num_bins``, as 0-dim CPU tensors of the
    IoUs' dtype (cached), for float32 and float64 IoUs; None for other dtypes.

    An operation with a Python number wraps the number into a tensor and converts it to the
    other operand's dtype on every call, a noticeable part of the per-image cost at ROI-head
    sizes; these tensors are that conversion done once. The results are bit-identical: on CPU
    the kernel receives the same float32 (float64) value; on CUDA a 0-dim CPU tensor is, like a
    Python number, a "CPU scalar" read on the host and cast to the computation type (division
    by it becomes multiplication by its reciprocal in both cases). Half-precision kernels can
    read a number and a half tensor differently, so other dtypes keep Python numbers.
    """
    if dtype not in (torch.float32, torch.float64):
        return None
    return torch.tensor(1e-6, dtype=dtype), torch.tensor(float(num_bins), dtype=dtype)


@torch.jit.script
def _iou_bins(iou: torch.Tensor, low: torch.Tensor, high: torch.Tensor, num_bins: int,
              constants: Optional[BinConstants]) -> torch.Tensor:
    """:func:`iou_bins_highest_first`, with :func:`bin_constants` given."""
    # The 1e-6 keeps (high - low) / width below num_bins (no clamp needed) and puts every IoU
    # of a zero-width range (all IoUs equal) in bin 0.
    if constants is None:
        width = torch.sub(high, low).add_(1e-6).div_(num_bins)
    else:
        eps, k = constants
        width = torch.sub(high, low).add_(eps).div_(k)
    return torch.sub(high, iou).div_(width).to(torch.int64)


def iou_bins_highest_first(iou: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                           num_bins: int) -> torch.Tensor:
    """
    Bin of each IoU for ``num_bins`` equal bins over ``[low, high]``, bin 0 = highest IoUs:
    ``int((high - iou) / width)`` with ``width = (high - low + 1e-6) / num_bins``.

    Args:
        iou (Tensor[float]): (n,) IoUs in ``[low, high]``.
        low, high (Tensor[float]): 0-dim range ends.
        num_bins (int): number of bins.

    Returns:
        Tensor[int64]: (n,) bins in ``[0, num_bins)``.
    """
    return _iou_bins(iou, low, high, num_bins, bin_constants(num_bins, iou.dtype))


@torch.jit.script
def _sample_iou_balanced(negatives: torch.Tensor, num: int, ious: torch.Tensor, num_bins: int,
                         constants: Optional[BinConstants], words: int, table: CounterTable,
                         field_mask: torch.Tensor) -> torch.Tensor:
    """:func:`sample_iou_balanced`, with :func:`bin_constants` and the ranking's counter layout
    (for ``num_bins`` groups) given."""
    negatives, trivial = shuffle_unless_trivial(negatives, num)
    if trivial:
        return negatives
    iou = ious.index_select(0, negatives)
    low, high = torch.aminmax(iou)
    bins = _iou_bins(iou, low, high, num_bins, constants)
    # Water-filling keys (rank within bin, bin): see grouped_ranking.water_filling_keys.
    keys = torch.add(bins, counts_so_far(bins, words, table, field_mask), alpha=num_bins)
    return take_smallest_keys(negatives, keys, num)


def sample_iou_balanced(negatives: torch.Tensor, num: int, ious: torch.Tensor,
                        num_bins: int) -> torch.Tensor:
    """
    Draw ``num`` negatives, as evenly as possible across ``num_bins`` equal IoU bins spanning the
    negatives' own IoU range (uniformly inside a bin; see :class:`IoUBalancedSampler`).

    Args:
        negatives (Tensor[int64]): (n,) candidate indices.
        num (int): how many to draw.
        ious (Tensor[float]): (N,) max IoU of every candidate with any ground truth.
        num_bins (int): number of bins K.

    Returns:
        Tensor[int64]: (min(num, n),) distinct indices.
    """
    return _sample_iou_balanced(negatives, num, ious, num_bins,
                                bin_constants(num_bins, ious.dtype),
                                *counter_table(num_bins, negatives.numel(), negatives.device))


@torch.jit.script
def _sample_iou_balanced_with_floor(negatives: torch.Tensor, num: int, ious: torch.Tensor,
                                    num_bins: int, floor_thresh: float, floor_fraction: float,
                                    constants: Optional[BinConstants], words: int,
                                    table: CounterTable, field_mask: torch.Tensor) -> torch.Tensor:
    """:func:`sample_iou_balanced_with_floor`, with :func:`bin_constants` and the counter layout
    for ``num_bins + 1`` groups given."""
    negatives, trivial = shuffle_unless_trivial(negatives, num)
    if trivial:
        return negatives
    n, k = negatives.numel(), num_bins
    iou = ious.index_select(0, negatives)
    floor = iou < floor_thresh
    inf = torch.full((), float("inf"), device=iou.device)
    low = torch.where(floor, inf, iou).amin()
    high = torch.where(floor, -inf, iou).amax()
    group = torch.where(floor, k, _iou_bins(iou, low, high, k, constants))
    rank = counts_so_far(group, words, table, field_mask).sub_(1)
    num_floor = (group == k).sum()
    take_binned = torch.clamp(n - num_floor, max=int(num * (1.0 - floor_fraction)))
    take_floor = torch.minimum(num_floor, num - take_binned)
    # Floor members inside the floor quota are always taken (key -1), the others never (the
    # binned negatives fill the rest of the quota; there are enough of them). Binned negatives
    # are water-filled across the bins.
    floor_keys = torch.where(rank < take_floor, -1, n * (k + 1))
    keys = torch.where(floor, floor_keys, torch.add(group, rank, alpha=k))
    return take_smallest_keys(negatives, keys, num)


def sample_iou_balanced_with_floor(negatives: torch.Tensor, num: int, ious: torch.Tensor,
                                   num_bins: int, floor_thresh: float,
                                   floor_fraction: float) -> torch.Tensor:
    """
    :func:`sample_iou_balanced` with a floor group: negatives with IoU below ``floor_thresh``
    get ``floor_fraction`` of the quota, drawn uniformly; the others are IoU-balanced over their
    own IoU range; each part refills the other's shortfall.

    Args:
        negatives, num, ious, num_bins: see :func:`sample_iou_balanced`.
        floor_thresh (float): IoU below which a negative is in the floor group (>= 0).
        floor_fraction (float): share of the quota for the floor group, in [0, 1].

    Returns:
        Tensor[int64]: (min(num, n),) distinct indices.
    """
    return _sample_iou_balanced_with_floor(
        negatives, num, ious, num_bins, floor_thresh, floor_fraction,
        bin_constants(num_bins, ious.dtype),
        *counter_table(num_bins + 1, negatives.numel(), negatives.device)
    )


@torch.jit.script
def _sample_iou_balanced_mmdet(negatives: torch.Tensor, num: int, ious: torch.Tensor,
                               num_bins: int, floor_thresh: float, floor_fraction: float,
                               words: int, table: CounterTable,
                               field_mask: torch.Tensor) -> torch.Tensor:
    """:func:`sample_iou_balanced_mmdet`, counter layout for ``num_bins + 2`` groups given."""
    negatives, trivial = shuffle_unless_trivial(negatives, num)
    if trivial:
        return negatives
    n, k = negatives.numel(), num_bins
    iou = ious.index_select(0, negatives)
    low = max(floor_thresh, 0.0)
    if floor_thresh < 0:
        floor = torch.zeros_like(iou, dtype=torch.bool)
    elif floor_thresh == 0:
        floor = iou == 0
    else:
        floor = iou < floor_thresh
    if k == 1:  # mmdetection draws uniformly from the non-floor negatives
        in_bin = ~floor
        bins = torch.zeros_like(negatives)
    else:
        # Bins [low + i w, low + (i + 1) w), w = (max IoU of all candidates - low) / K.
        position = (iou - low) / ((ious.amax() - low) / k)
        in_bin = ~floor & (position < k)  # NaN / inf (zero width) compare False
        bins = torch.where(in_bin, position, torch.zeros_like(position)).to(torch.int64)
    unbinned, floor_group = k, k + 1
    group = torch.where(floor, floor_group, torch.where(in_bin, bins, unbinned))
    rank = counts_so_far(group, words, table, field_mask).sub_(1)
    num_floor = (group == floor_group).sum()
    expected_binned = int(num * (1.0 - floor_fraction))
    take_binned = torch.clamp(n - num_floor, max=expected_binned)
    take_floor = torch.minimum(num_floor, num - take_binned)
    # Tiers, taken in order: floor quota, per-bin quotas, uniform refill from the other
    # non-floor negatives, then the rest of the floor (never reached: see take_floor).
    tier = torch.where(
        floor,
        torch.where(rank < take_floor, 0, 3),
        torch.where((group < k) & (rank < expected_binned // k), 1, 2),
    )
    # Within a tier the order must be independent of the ranks (which decided the tiers): a
    # fresh random permutation, so that the refill is uniform over what is left.
    keys = torch.add(torch.randperm(n, device=iou.device), tier, alpha=n)
    return take_smallest_keys(negatives, keys, num)


def sample_iou_balanced_mmdet(negatives: torch.Tensor, num: int, ious: torch.Tensor,
                              num_bins: int, floor_thresh: float,
                              floor_fraction: float) -> torch.Tensor:
    """
    mmdetection 3.x ``IoUBalancedNegSampler._sample_neg`` behaviour (one call; the rewrite of
    ``floor_thresh`` -1 to 0 between calls is the caller's, see :class:`IoUBalancedSampler`).

    Floor group: IoU == 0 if ``floor_thresh == 0``, IoU < ``floor_thresh`` if it is > 0, none if
    it is < 0. The others are binned over ``[max(floor_thresh, 0), max IoU of ALL candidates)``
    (a bin's interval excludes its upper end); each bin gets ``int(q / num_bins)`` with
    ``q = int(num * (1 - floor_fraction))``, the rest of ``q`` is drawn uniformly from the
    other non-floor negatives, the floor group fills what is left of ``num``, and the non-floor
    negatives the rest.

    Args:
        negatives, num, ious, num_bins: see :func:`sample_iou_balanced`.
        floor_thresh (float): this call's floor threshold.
        floor_fraction (float): see :class:`IoUBalancedSampler`.

    Returns:
        Tensor[int64]: (min(num, n),) distinct indices.
    """
    return _sample_iou_balanced_mmdet(
        negatives, num, ious, num_bins, floor_thresh, floor_fraction,
        *counter_table(num_bins + 2, negatives.numel(), negatives.device)
    )


@torch.jit.script
def _libra_sample(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                  bg_label: int, ious: torch.Tensor, gt_index: torch.Tensor, num_gt: int,
                  num_bins: int, instance_balanced: bool, constants: Optional[BinConstants],
                  box_words: int, box_table: CounterTable, bin_words: int,
                  bin_table: CounterTable,
                  field_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`libra_sample`, with :func:`bin_constants` and the counter layouts (for ``num_gt``
    and ``num_bins`` groups) given."""
    positive, negative, num_pos, num_neg = split_candidates(
        labels, num_samples, positive_fraction, bg_label
    )
    if instance_balanced:
        positive = _sample_instance_balanced(positive, num_pos, gt_index, num_gt, box_words,
                                             box_table, field_mask)
    else:
        positive = sample_uniform(positive, num_pos)
    negative = _sample_iou_balanced(negative, num_neg, ious, num_bins, constants, bin_words,
                                    bin_table, field_mask)
    return positive, negative


@functools.lru_cache(maxsize=256)
def _paper_constants(num_gt: int, num_bins: int, bits: int, device: torch.device,
                     dtype: torch.dtype):
    """
    The constant arguments of :func:`_libra_sample` after ``instance_balanced``: the bin
    constants for IoUs of ``dtype``, the counter layouts of the boxes and of the bins for up to
    ``2**bits - 1`` candidates (same field width, hence one field mask).
    """
    box_words, box_table, field_mask = counter_table(num_gt, (1 << bits) - 1, device)
    bin_words, bin_table, _ = counter_table(num_bins, (1 << bits) - 1, device)
    return (bin_constants(num_bins, dtype), box_words, box_table, bin_words, bin_table,
            field_mask)


def libra_sample(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                 bg_label: int, ious: torch.Tensor, gt_index: torch.Tensor, num_gt: int,
                 num_bins: int, instance_balanced: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The paper's sampler in one compiled call: IoU-balanced negatives (no floor group) and
    instance-balanced (or uniform) positives. Arguments as :meth:`IoUBalancedSampler.__call__`.

    Returns:
        Tensor[int64], Tensor[int64]: sampled positive and negative indices.
    """
    constants = _paper_constants(num_gt, num_bins, labels.numel().bit_length(), labels.device,
                                 ious.dtype)
    return _libra_sample(labels, num_samples, positive_fraction, bg_label, ious, gt_index,
                         num_gt, num_bins, instance_balanced, *constants)


@SAMPLER_REGISTRY.register()
class IoUBalancedSampler(Sampler):
    """
    IoU-balanced negatives plus instance-balanced (or random) positives.

    Default behaviour (the paper's): the ``num_bins`` bins span the negatives' *own* IoU range
    ``[min, max]`` (so all of them hold negatives). With ``floor_thresh >= 0`` negatives whose IoU
    is below it form a "floor" group that gets ``floor_fraction`` of the quota by uniform random
    sampling, and the bins span the IoU range of the other negatives; when one part runs short
    the other refills it. When the balanced quota leaves a remainder of ``r`` negatives, the
    ``r`` highest-IoU bins (that still have negatives) get one more each.

    ``mmdet_compat=True`` reproduces mmdetection 3.x ``IoUBalancedNegSampler`` instead:

    - the bins span ``[floor, max IoU over ALL candidates]`` (positives and the ground truths
      added as proposals included, so usually ``[0, 1]``: for ROI heads the top bin ``2/3..1``
      never holds a negative), a bin's interval excludes its upper end, each bin gets
      ``int(quota / num_bins)`` and the remainder is drawn uniformly from the other negatives;
    - ``floor_thresh=-1`` is rewritten to 0 by the first call that samples, so from then on
      negatives with IoU exactly 0 form the floor group and, with ``floor_fraction=0``, are
      only drawn when the negatives with IoU > 0 do not fill the quota (the state belongs
      to the sampler object, i.e. to one head, as in mmdetection).

    Positives are never sampled twice, with or without ``mmdet_compat`` (mmdetection's
    InstanceBalancedPosSampler can return duplicates; that is not reproduced).

    Args:
        num_bins (int): ``K`` >= 1 (paper: 3; ``K = 1`` is uniform random sampling).
        floor_thresh (float): IoU below which negatives form the floor group; negative values
            disable the floor group (paper default -1).
        floor_fraction (float): share of the negative quota for the floor group, in [0, 1].
        positives (str): "instance_balanced" (paper) or "random".
        mmdet_compat (bool): reproduce mmdetection 3.x's behaviour (see above).
    """

    needs_match_quality = True
    #: Valid values of the arguments (and of the <head>.IOU_BALANCED_SAMPLER keys).
    PARAMS = {
        "num_bins": Int(low=1),
        "floor_thresh": Float(high=1.0, high_open=True),
        "floor_fraction": Float(0.0, 1.0),
        "positives": OneOf(*_POSITIVE_MODES),
        "mmdet_compat": Bool(),
    }

    def __init__(self, num_bins=3, floor_thresh=-1.0, floor_fraction=0.0,
                 positives="instance_balanced", mmdet_compat=False):
        args = check_params(self.PARAMS, num_bins=num_bins, floor_thresh=floor_thresh,
                            floor_fraction=floor_fraction, positives=positives,
                            mmdet_compat=mmdet_compat)
        self.num_bins = args["num_bins"]
        self.floor_thresh = args["floor_thresh"]
        self.floor_fraction = args["floor_fraction"]
        self.positives = positives
        self.mmdet_compat = mmdet_compat
        # mmdetection's floor threshold is state: -1 becomes 0 after the first sampling call.
        self._mmdet_floor_thresh = self.floor_thresh

    @classmethod
    def from_config(cls, cfg, head_key):
        """
        Args:
            cfg (CfgNode): reads ``<head_key>.IOU_BALANCED_SAMPLER``.
            head_key (str): "MODEL.ROI_HEADS" or "MODEL.RPN".

        Returns:
            IoUBalancedSampler
        """
        return cls(**read_params(cfg, f"{head_key}.IOU_BALANCED_SAMPLER", cls.PARAMS))

    def __call__(self, labels, num_samples, positive_fraction, bg_label, *, ious=None,
                 gt_index=None, num_gt=0):
        """
        See :meth:`Sampler.__call__`. ``ious`` is required; ``gt_index`` and ``num_gt`` too with
        instance-balanced positives.
        """
        if ious is None:
            raise ValueError("IoUBalancedSampler needs ious (each candidate's max IoU with a GT)")
        if ious.dtype in (torch.float16, torch.bfloat16):
            ious = ious.float()  # the bins' 1e-6 margin is below half precision's resolution
        instance_balanced = self.positives == "instance_balanced"
        if instance_balanced and gt_index is None:
            raise ValueError("instance-balanced positives need gt_index (matched GT indices)")
        if gt_index is None:
            gt_index = labels.new_zeros(labels.shape, dtype=torch.int64)  # unused
        if not self.mmdet_compat and self.floor_thresh < 0:
            return libra_sample(labels, num_samples, positive_fraction, bg_label, ious,
                                gt_index, num_gt, self.num_bins, instance_balanced)
        positive, negative, num_pos, num_neg = split_candidates(
            labels, num_samples, positive_fraction, bg_label
        )
        if instance_balanced:
            pos = sample_instance_balanced(positive, num_pos, gt_index, num_gt)
        else:
            pos = sample_uniform(positive, num_pos)
        if not self.mmdet_compat:
            return pos, sample_iou_balanced_with_floor(
                negative, num_neg, ious, self.num_bins, self.floor_thresh, self.floor_fraction
            )
        floor_thresh = self._mmdet_floor_thresh
        if floor_thresh < 0 and num_neg < negative.numel():
            # mmdetection rewrites floor_thr=-1 to 0 in its first call that samples.
            self._mmdet_floor_thresh = 0.0
        return pos, sample_iou_balanced_mmdet(
            negative, num_neg, ious, self.num_bins, floor_thresh, self.floor_fraction
        )

    def __repr__(self):
        return (
            f"IoUBalancedSampler(num_bins={self.num_bins}, floor_thresh={self.floor_thresh}, "
            f"floor_fraction={self.floor_fraction}, positives={self.positives!r}, "
            f"mmdet_compat={self.mmdet_compat})"
        )
