"""Vectorised per-group ranking: the building block of the balanced samplers and of OHEM.

Balanced sampling needs, for elements visited in a random order, each element's position among
the elements of its own group (IoU bin, or matched ground truth). Taking the ``k`` smallest
``rank * num_groups + group`` then samples the groups as evenly as possible ("water filling"):
every group gets an equal share, a group with fewer members gives all of them and the shortfall
goes, again evenly, to the others. OHEM keeps the ``B`` best-ranked RoIs of every image the same
way. One stable sort by group does it, on the tensors' device, with no loop over groups and no
host synchronisation (group sizes are accumulated with ``scatter_add_``, not ``bincount``).

The functions are TorchScript-compiled (the samplers run them once per image); ``PYTORCH_JIT=0``
runs them as plain Python.
"""
from typing import Tuple

import torch

__all__ = ["rank_within_groups", "water_filling_keys"]


@torch.jit.script
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
    sizes = torch.zeros(num_groups, dtype=torch.long, device=groups.device)
    n = groups.numel()
    if n == 0:
        return groups.new_zeros(0), sizes
    sizes.scatter_add_(0, groups, torch.ones_like(groups))
    order = torch.sort(groups, stable=True)[1]
    starts = torch.cumsum(sizes, 0) - sizes
    rank_sorted = torch.arange(n, device=groups.device) - starts.index_select(
        0, groups.index_select(0, order)
    )
    return torch.empty_like(groups).scatter_(0, order, rank_sorted), sizes


@torch.jit.script
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
        Tensor[int64]: (n,) keys, ordered as ``(rank within group, group)``.
    """
    rank = rank_within_groups(groups, num_groups)[0]
    return torch.add(groups, rank + 1, alpha=num_groups)
