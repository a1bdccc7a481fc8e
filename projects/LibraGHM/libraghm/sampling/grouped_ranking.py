"""Vectorised per-group ranking: the building block of the balanced samplers.

Balanced sampling needs, for elements visited in a random order, each element's position among
the elements of its own group (IoU bin, or matched ground truth). Taking the ``k`` smallest
``rank * num_groups + group`` then samples the groups as evenly as possible ("water filling"):
every group gets an equal share, a group with fewer members gives all of them and the shortfall
goes, again evenly, to the others. Everything is a few whole-tensor operations on the tensors'
device: no loop over groups, no host synchronisation.

Three equivalent ways to rank, picked by size (the result does not depend on the choice):

- "onehot": a (groups x n) membership matrix and one cumulative sum along it; the fewest
  operations, for small problems (ROI-head sizes);
- "packed": the running count of every group kept in a bit field of int64 words, so that one
  1-D cumulative sum advances all counters at once: a few passes over the elements whatever the
  number of groups (RPN sizes: ~50k anchors, a few IoU bins);
- "sort": a stable sort by group, for many groups and many elements.

The functions are TorchScript-compiled (the samplers run them once per image, and the
interpreter's lower per-operation overhead matters at ROI-head sizes); ``PYTORCH_JIT=0`` runs
them as plain Python.
"""
from typing import Optional, Tuple

import torch

__all__ = ["rank_within_groups", "water_filling_keys"]

@torch.jit.script
def _packed_layout(n: int, num_groups: int) -> Tuple[int, int, int]:
    bits = 1
    while (1 << bits) <= n:  # every count is <= n < 2 ** bits
        bits += 1
    per_word = 63 // bits  # counters per int64 word (the sign bit is never used)
    return bits, per_word, (num_groups + per_word - 1) // per_word


@torch.jit.script
def _pick_method(n: int, num_groups: int, method: str) -> str:
    if method == "auto":
        if num_groups * n <= 16384:  # membership matrix up to 2**14 entries
            return "onehot"
        if _packed_layout(n, num_groups)[2] * n <= 16777216:  # up to 2**24 counter words
            return "packed"
        return "sort"
    if method != "onehot" and method != "packed" and method != "sort":
        raise ValueError("method must be 'auto', 'onehot', 'packed' or 'sort'")
    return method


@torch.jit.script
def _count_onehot(groups: torch.Tensor, num_groups: int,
                  with_sizes: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    ids = torch.arange(num_groups, device=groups.device).unsqueeze(1)
    row = groups.unsqueeze(0)
    running = (row == ids).cumsum(1)  # running[g, i]: members of group g in [0, i]
    count = running.gather(0, row).squeeze(0)
    if with_sizes:
        return count, running[:, -1]
    return count, None


@torch.jit.script
def _count_packed(groups: torch.Tensor, num_groups: int,
                  with_sizes: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    n = groups.numel()
    layout = _packed_layout(n, num_groups)
    bits, per_word, num_words = layout[0], layout[1], layout[2]
    mask = (1 << bits) - 1
    ids = torch.arange(num_groups, device=groups.device)
    shift_table = torch.remainder(ids, per_word) * bits
    unit = torch.bitwise_left_shift(torch.ones_like(ids), shift_table).index_select(0, groups)
    shift = shift_table.index_select(0, groups)
    word_table = torch.div(ids, per_word, rounding_mode="floor")
    if num_words == 1:
        running = torch.cumsum(unit, 0)  # field g of running[i]: members of group g in [0, i]
        word_totals = running[-1:]
    else:
        word = word_table.index_select(0, groups)
        # One counter row per word, laid end to end so that one 1-D cumsum advances them all.
        slot = torch.add(torch.arange(n, device=groups.device), word, alpha=n)
        flat = groups.new_zeros(num_words * n).index_copy_(0, slot, unit)
        rows = torch.cumsum(flat, 0).view(num_words, n)
        ends = rows[:, -1]
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        word_totals = ends - starts
        running = rows.view(-1).index_select(0, slot).sub_(starts.index_select(0, word))
    sizes: Optional[torch.Tensor] = None
    if with_sizes:  # (before the in-place extraction below, which overwrites word_totals)
        sizes = torch.bitwise_and(
            torch.bitwise_right_shift(word_totals.index_select(0, word_table), shift_table), mask
        )
    count = running.bitwise_right_shift_(shift).bitwise_and_(mask)
    return count, sizes


@torch.jit.script
def _count_sorted(groups: torch.Tensor, num_groups: int,
                  with_sizes: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    n = groups.numel()
    order = torch.sort(groups, stable=True)[1]
    sizes = torch.zeros(num_groups, dtype=torch.long, device=groups.device)
    sizes.scatter_add_(0, groups, torch.ones_like(groups))
    starts = torch.cumsum(sizes, 0) - sizes
    count_in_sorted = torch.arange(1, n + 1, device=groups.device) - starts[groups[order]]
    count = torch.empty_like(groups).scatter_(0, order, count_in_sorted)
    return count, sizes


@torch.jit.script
def _count(groups: torch.Tensor, num_groups: int, method: str,
           with_sizes: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """1-based rank of every element in its group, and (optionally) the group sizes."""
    method = _pick_method(groups.numel(), num_groups, method)
    if method == "onehot":
        return _count_onehot(groups, num_groups, with_sizes)
    if method == "packed":
        return _count_packed(groups, num_groups, with_sizes)
    return _count_sorted(groups, num_groups, with_sizes)


@torch.jit.script
def rank_within_groups(groups: torch.Tensor, num_groups: int,
                       method: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Rank every element among the elements of its own group, in the given order.

    Args:
        groups (Tensor[int64]): (n,) group id of each element, in ``[0, num_groups)``.
        num_groups (int): number of groups.
        method (str): "onehot", "packed", "sort" (see the module docstring) or "auto" (by size).

    Returns:
        Tensor[int64]: (n,) ``rank[i]`` = number of elements ``j < i`` with
            ``groups[j] == groups[i]``.
        Tensor[int64]: (num_groups,) number of elements in each group.
    """
    if groups.numel() == 0:
        return groups.new_zeros(0), torch.zeros(num_groups, dtype=torch.long,
                                                device=groups.device)
    count, sizes = _count(groups, num_groups, method, True)
    assert sizes is not None
    return count - 1, sizes


@torch.jit.script
def water_filling_keys(groups: torch.Tensor, num_groups: int,
                       method: str = "auto") -> torch.Tensor:
    """
    Keys whose ``k`` smallest values sample the groups as evenly as possible.

    With the elements in a random order, the ``k`` smallest keys take the first ``r`` elements
    of every group (all of a group smaller than ``r``), with the largest such ``r``, then one
    more element from the groups of lowest id until ``k`` are chosen. Keys are distinct.

    Args:
        groups (Tensor[int64]): (n,) group ids in ``[0, num_groups)``, elements in random order.
        num_groups (int): number of groups.
        method (str): see :func:`rank_within_groups`.

    Returns:
        Tensor[int64]: (n,) keys, ordered as ``(rank within group, group)``.
    """
    if groups.numel() == 0:
        return groups.new_zeros(0)
    # 1-based counts order the elements exactly as ranks do.
    count = _count(groups, num_groups, method, False)[0]
    return torch.add(groups, count, alpha=num_groups)
