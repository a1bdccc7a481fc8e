"""Vectorised per-group ranking: the building block of the balanced samplers and of OHEM.

Balanced sampling needs, for elements visited in a random order, each element's position among
the elements of its own group (IoU bin, or matched ground truth). Taking the ``k`` smallest
``rank * num_groups + group`` then samples the groups as evenly as possible ("water filling"):
every group gets an equal share, a group with fewer members gives all of them and the shortfall
goes, again evenly, to the others. OHEM keeps the ``B`` best-ranked RoIs of every image the same
way.

The algorithm: packed counters and one cumulative sum. Each group owns a ``bits``-wide field of
an int64 word (``bits`` is the bit length of the number of elements, so no field can overflow
into the next; ``63 // bits`` fields per word). Element ``i`` adds 1 to its group's field, a
cumulative sum over the elements turns that into, for every element, the counts of all groups up
to and including it, and the element reads its own group's field back: ``rank + 1``. With few
groups (IoU bins) that is a single 1-D ``cumsum``; with more (ground-truth boxes, images) several
words per element: while they fit in the cache (up to 2**15 counters) each element's row of words
is looked up in a table and the rows are summed, beyond that one row of counters per word (a
cumulative sum along contiguous memory). Everything runs on the tensors' device, with no loop over
groups and no host synchronisation. Time and memory are ``O(n * ceil(num_groups / (63 // bits)))``;
past ``max_counters`` (2**24) counters the words are processed in blocks, so memory stays bounded.

The layout of the fields (which word and bit offset each group has) is a small table that
depends only on the number of groups, ``bits`` and the device; it is built once and cached
(:func:`counter_table`). The compiled samplers take it as an argument: per-call arithmetic with
Python numbers costs a temporary tensor per operation, which matters at ROI-head sizes.

The compiled functions are TorchScript (one call per image); ``PYTORCH_JIT=0`` runs them as
plain Python with identical results.
"""
import functools
from typing import Tuple

import torch

__all__ = [
    "rank_within_groups", "water_filling_keys", "counter_table", "counts_so_far", "CounterTable"
]

#: Per group: index of its word, bit offset of its field, ``1 << offset`` (three (G,) tensors),
#: and its whole row of words, ``1 << offset`` in its own word and 0 in the others (G, words).
CounterTable = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def counter_table(num_groups: int, max_count: int,
                  device) -> Tuple[int, CounterTable, torch.Tensor]:
    """
    The packed-counter layout for ``num_groups`` groups and at most ``max_count`` elements
    (cached: built once per number of groups, field width and device).

    Args:
        num_groups (int): number of groups.
        max_count (int): upper bound on the number of elements to rank (fields must hold it).
        device (torch.device): where the tables live.

    Returns:
        int: number of int64 words per element.
        CounterTable: three (num_groups,) int64 tensors: per group, the index of its word, the
            bit offset of its field in that word and ``1 << offset``; and a (num_groups, words)
            int64 tensor: per group, ``1 << offset`` in its own word and 0 in the others.
        Tensor[int64]: 0-dim mask of one field, ``(1 << bits) - 1``.
    """
    return _counter_table(num_groups, max(int(max_count).bit_length(), 1), torch.device(device))


@functools.lru_cache(maxsize=256)
def _counter_table(num_groups: int, bits: int, device: torch.device):
    # 63 bits per word: the sign bit stays clear, so the counters never overflow an int64.
    per_word = 63 // bits
    group = torch.arange(num_groups, dtype=torch.long)
    shift = (group % per_word) * bits
    word, unit = group // per_word, torch.ones_like(shift) << shift
    words = -(-num_groups // per_word)
    rows = torch.zeros(num_groups, words, dtype=torch.long)
    rows.scatter_(1, word.unsqueeze(1), unit.unsqueeze(1))
    mask = torch.tensor((1 << bits) - 1, dtype=torch.long)
    table = (word.to(device), shift.to(device), unit.to(device), rows.to(device))
    return words, table, mask.to(device)


@torch.jit.script
def counts_so_far(groups: torch.Tensor, words: int, table: CounterTable,
                  field_mask: torch.Tensor, max_counters: int = 16777216,
                  max_cached_counters: int = 32768) -> torch.Tensor:
    """
    ``rank + 1`` of every element: how many elements ``j <= i`` are in the group of element ``i``.

    Args:
        groups (Tensor[int64]): (n,) group ids, elements in the order that defines the ranks.
        words, table, field_mask: :func:`counter_table` for at least ``n`` elements.
        max_counters (int): largest number of int64 counters (elements x words) held at once;
            more are processed in blocks of words.
        max_cached_counters (int): up to this many counters, the counters are laid out one row
            of words per element (fewer operations, but the cumulative sum strides across the
            rows, which is only fast while they fit in the cache).

    Returns:
        Tensor[int64]: (n,) counts, >= 1.
    """
    word_t, shift_t, unit_t, rows_t = table
    n = groups.numel()
    if words <= 1:  # one word (0 only when there are no groups, hence no elements)
        counts = unit_t.index_select(0, groups).cumsum_(0)
    elif n * words <= max_cached_counters:  # (n, words): each element's row, from the table
        word = word_t.index_select(0, groups).unsqueeze(1)
        counts = rows_t.index_select(0, groups).cumsum_(0).gather(1, word).squeeze(1)
    else:
        # One row of counters per word, (words, n): the cumulative sum runs along contiguous rows.
        word = word_t.index_select(0, groups).unsqueeze(0)
        unit = unit_t.index_select(0, groups).unsqueeze(0)
        block = max(1, min(words, max_counters // max(n, 1)))
        if block == words:
            counts = torch.zeros((words, n), dtype=unit.dtype, device=unit.device).scatter_(
                0, word, unit).cumsum_(1).gather(0, word)
        else:  # bounded memory: one block of words at a time
            counts = torch.zeros_like(unit)
            for first in range(0, words, block):
                inside = (word >= first) & (word < first + block)
                local = torch.where(inside, word - first, 0)
                part = torch.zeros((block, n), dtype=unit.dtype, device=unit.device).scatter_(
                    0, local, torch.where(inside, unit, 0)).cumsum_(1)
                counts += torch.where(inside, part.gather(0, local), 0)
        counts = counts.squeeze(0)
    # In place: at the samplers' sizes a new tensor costs more than the arithmetic.
    return counts.bitwise_right_shift_(shift_t.index_select(0, groups)).bitwise_and_(field_mask)


def rank_within_groups(groups: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Rank every element among the elements of its own group, in the given order.

    Args:
        groups (Tensor[int64]): (n,) group id of each element, in ``[0, num_groups)``.
        num_groups (int): number of groups.

    Returns:
        Tensor[int64]: (n,) ``rank[i]`` = number of elements ``j < i`` with
            ``groups[j] == groups[i]``.
        Tensor[int64]: (num_groups,) number of elements in each group.
    """
    rank = counts_so_far(groups, *counter_table(num_groups, groups.numel(), groups.device)).sub_(1)
    sizes = torch.zeros(num_groups, dtype=torch.long, device=groups.device)
    return rank, sizes.scatter_add_(0, groups, torch.ones_like(groups))


def water_filling_keys(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """
    Keys whose ``k`` smallest values sample the groups as evenly as possible.

    With the elements in a random order, the ``k`` smallest keys take the first ``r`` elements
    of every group (all of a group smaller than ``r``), with the largest such ``r``, then one
    more element from the groups of lowest id until ``k`` are chosen. Keys are distinct.

    Args:
        groups (Tensor[int64]): (n,) group ids in ``[0, num_groups)``, elements in random order.
        num_groups (int): number of groups.

    Returns:
        Tensor[int64]: (n,) keys ``group + num_groups * (rank within group + 1)``, i.e. ordered
        as ``(rank within group, group)``.
    """
    counts = counts_so_far(groups, *counter_table(num_groups, groups.numel(), groups.device))
    return torch.add(groups, counts, alpha=num_groups)
