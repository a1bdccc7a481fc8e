"""Tests of LibraGHM's samplers (libraghm/sampling/) and of the heads that use them
(libraghm/modeling/roi_heads.py: LibraGHMROIHeads, libraghm/modeling/rpn.py: LibraGHMRPN).

Statistics are checked on synthetic candidate sets whose IoU distribution is known exactly
(flat IoU-bin histograms, exact per-box positive counts, mmdetection's compatibility behaviour
against its closed-form expectation), the grouped ranking against a plain Python reference, the
default random sampler against Detectron2's own sampling bit for bit, and the heads in tiny
Faster / Mask R-CNN training steps. OHEM (also a sampler) is tested in test_ohem.py.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from conftest import REPO, get_config, tiny_batch
from libraghm.losses import CLASSIFICATION_LOSS_REGISTRY
from libraghm.modeling import LibraGHMRPN
from libraghm.modeling.roi_heads import SAMPLING_PARAMS
from libraghm.sampling.grouped_ranking import counter_table, counts_so_far
from libraghm.sampling import (
    SAMPLER_REGISTRY,
    InstanceBalancedSampler,
    IoUBalancedSampler,
    IoURecordingMatcher,
    NoSampling,
    OHEMSampler,
    RandomSampler,
    build_sampler,
    rank_within_groups,
    water_filling_keys,
)
from libraghm.validation import cfg_node

BG = 80  # background label of the synthetic ROI-head problems (80 classes)


# ---------------------------------------------------------------------------------------------
# Synthetic candidate sets
# ---------------------------------------------------------------------------------------------
def candidates(neg_ious, pos_per_gt=(), pos_iou=0.8, ignored=0, seed=0):
    """
    A shuffled candidate set: negatives with the given IoUs, ``pos_per_gt[g]`` positives matched
    to GT ``g`` (IoU ``pos_iou``; the first positive of each GT has IoU 1, as a GT box added as
    a proposal), ``ignored`` candidates labelled -1.

    Returns:
        dict: labels, ious, gt_index, num_gt.
    """
    g = torch.Generator().manual_seed(seed)
    neg_ious = torch.as_tensor(neg_ious, dtype=torch.float32)
    per_gt = torch.tensor(pos_per_gt, dtype=torch.long)
    num_pos = int(per_gt.sum())
    labels = torch.cat([
        torch.full((len(neg_ious),), BG),
        torch.full((num_pos,), 3),
        torch.full((ignored,), -1),
    ])
    gt_index = torch.cat([
        torch.zeros(len(neg_ious), dtype=torch.long),
        torch.repeat_interleave(torch.arange(len(per_gt)), per_gt),
        torch.zeros(ignored, dtype=torch.long),
    ])
    pos_ious = torch.full((num_pos,), pos_iou)
    firsts = (per_gt.cumsum(0) - per_gt)[per_gt > 0]
    pos_ious[firsts] = 1.0
    ious = torch.cat([neg_ious, pos_ious, torch.full((ignored,), 0.45)])
    perm = torch.randperm(len(labels), generator=g)
    return dict(labels=labels[perm], ious=ious[perm], gt_index=gt_index[perm],
                num_gt=len(pos_per_gt))


def uniform_ious(counts, low, high, seed=0):
    """``counts[b]`` IoUs uniform in the b-th of len(counts) equal sub-ranges of [low, high)."""
    g = torch.Generator().manual_seed(seed)
    k = len(counts)
    width = (high - low) / k
    parts = [low + width * (b + 0.02 + 0.96 * torch.rand(c, generator=g))
             for b, c in enumerate(counts)]
    return torch.cat(parts)


def run(sampler, c, num_samples, positive_fraction):
    return sampler(c["labels"], num_samples, positive_fraction, BG, ious=c["ious"],
                   gt_index=c["gt_index"], num_gt=c["num_gt"])


def bin_counts(values, pool, k):
    """Histogram of ``values`` over k equal bins spanning [min, max] of ``pool``, lowest first."""
    low, high = pool.min(), pool.max()
    bins = ((values - low) / (high - low) * k).long().clamp(max=k - 1)
    return torch.bincount(bins, minlength=k).tolist()


def negative_pool(c):
    return c["ious"][c["labels"] == BG]


def assert_valid(c, pos, neg, num_samples, positive_fraction):
    """Sampled indices are distinct, of the right type, and the quota is met exactly."""
    labels = c["labels"]
    n_pos = int(((labels != -1) & (labels != BG)).sum())
    n_neg = int((labels == BG).sum())
    want_pos = min(n_pos, int(num_samples * positive_fraction))
    want_neg = min(n_neg, num_samples - want_pos)
    assert pos.numel() == want_pos and neg.numel() == want_neg
    both = torch.cat([pos, neg])
    assert both.unique().numel() == both.numel(), "an index was sampled twice"
    assert bool((labels[pos] != BG).all() and (labels[pos] != -1).all())
    assert bool((labels[neg] == BG).all())


# ---------------------------------------------------------------------------------------------
# Grouped ranking (the vectorised primitive), against a plain Python reference
# ---------------------------------------------------------------------------------------------
def ref_rank_within_groups(groups, num_groups):
    """rank[i] = how many earlier elements share element i's group; sizes = group counts."""
    seen, rank = [0] * num_groups, []
    for x in groups:
        rank.append(seen[x])
        seen[x] += 1
    return rank, seen


def random_groups(n, num_groups, kind, g):
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if kind == "uniform":
        return torch.randint(num_groups, (n,), generator=g)
    if kind == "skewed":  # most elements in a few groups, many groups empty or tiny
        return (torch.rand(n, generator=g) ** 4 * num_groups).long().clamp(max=num_groups - 1)
    if kind == "sorted":
        return torch.randint(num_groups, (n,), generator=g).sort(descending=True).values
    return torch.full((n,), num_groups - 1)  # "one": every element in the last group


@pytest.mark.parametrize("n,num_groups", [
    (0, 3), (1, 1), (9, 3), (257, 1), (700, 4), (2000, 7), (5000, 12), (40, 70), (3000, 2500),
    (20000, 500),
])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "sorted", "one"])
def test_rank_within_groups_matches_python_reference(n, num_groups, kind):
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        groups = random_groups(n, num_groups, kind, g)
        before = groups.clone()
        rank, sizes = rank_within_groups(groups, num_groups)
        want_rank, want_sizes = ref_rank_within_groups(groups.tolist(), num_groups)
        assert rank.dtype == torch.int64 and sizes.dtype == torch.int64
        assert rank.shape == (n,) and sizes.shape == (num_groups,)
        assert rank.tolist() == want_rank
        assert sizes.tolist() == want_sizes
        assert torch.equal(groups, before)  # the input is not modified


@pytest.mark.parametrize("max_counters,max_cached_counters", [
    (1 << 24, 1 << 15),  # the defaults: rows per element at these sizes
    (1 << 24, 0),  # one row of counters per word
    (700, 0),  # blocks of words
])
def test_every_counter_layout_counts_the_same(max_counters, max_cached_counters):
    for n, num_groups in [(300, 40), (900, 20), (2000, 64), (500, 3)]:
        groups = random_groups(n, num_groups, "skewed", torch.Generator().manual_seed(n))
        counts = counts_so_far(groups, *counter_table(num_groups, n, groups.device),
                               max_counters, max_cached_counters)
        rank, _ = ref_rank_within_groups(groups.tolist(), num_groups)
        assert counts.tolist() == [r + 1 for r in rank], (n, num_groups)


def test_rank_within_groups_without_groups():
    rank, sizes = rank_within_groups(torch.zeros(0, dtype=torch.long), 0)
    assert rank.shape == (0,) and sizes.shape == (0,)
    assert rank.dtype == sizes.dtype == torch.int64


def test_rank_within_groups_of_a_strided_view():
    groups = torch.randint(5, (400,))
    view = groups[::3]  # not contiguous
    rank, sizes = rank_within_groups(view, 5)
    assert (rank.tolist(), sizes.tolist()) == ref_rank_within_groups(view.tolist(), 5)


@pytest.mark.parametrize("n,num_groups", [(0, 4), (1, 1), (500, 3), (3000, 40), (200, 900)])
def test_water_filling_keys_order_by_rank_then_group(n, num_groups):
    groups = random_groups(n, num_groups, "skewed", torch.Generator().manual_seed(n))
    keys = water_filling_keys(groups, num_groups)
    rank, _ = ref_rank_within_groups(groups.tolist(), num_groups)
    assert keys.dtype == torch.int64 and keys.shape == (n,)
    assert keys.unique().numel() == n  # distinct
    # Ascending keys = ascending (rank within group, group), the order water filling takes.
    want = sorted(range(n), key=lambda i: (rank[i], int(groups[i])))
    assert torch.argsort(keys).tolist() == want


@pytest.mark.parametrize("sizes,k", [((50, 7, 20, 3), 40), ((10, 10, 10), 29), ((1, 100), 60)])
def test_water_filling_keys_share_evenly(sizes, k):
    g = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    g = g[torch.randperm(len(g))]
    keys = water_filling_keys(g, len(sizes))
    assert keys.unique().numel() == keys.numel()
    chosen = torch.bincount(g[torch.topk(keys, k, largest=False).indices], minlength=len(sizes))
    # Reference: hand out one element per group per round, lowest group first.
    expect, left = [0] * len(sizes), k
    while left:
        for i, s in enumerate(sizes):
            if left and expect[i] < s:
                expect[i] += 1
                left -= 1
    assert chosen.tolist() == expect


# ---------------------------------------------------------------------------------------------
# IoU-balanced negatives (paper behaviour)
# ---------------------------------------------------------------------------------------------
def test_negative_histogram_is_flat_when_the_pool_allows():
    # Skewed pool, as in practice: most negatives have a low IoU.
    c = candidates(uniform_ious([3000, 400, 150], 0.0, 0.45), pos_per_gt=(40, 40))
    sampler = IoUBalancedSampler()
    neg_iou = c["ious"][c["labels"] == BG]
    for seed in range(5):
        torch.manual_seed(seed)
        pos, neg = run(sampler, c, 512, 0.25)
        assert_valid(c, pos, neg, 512, 0.25)
        assert bin_counts(c["ious"][neg], neg_iou, 3) == [144, 144, 144]  # 432 = 512 - 80
    # The random sampler follows the pool instead (150 of 3550 in the top bin: ~18 of 432).
    low, high = neg_iou.min(), neg_iou.max()
    top = []
    for seed in range(20):
        torch.manual_seed(seed)
        _, neg = run(RandomSampler(), c, 512, 0.25)
        top.append(int((c["ious"][neg] >= low + 2 * (high - low) / 3).sum()))
    assert 10 < sum(top) / len(top) < 28


def test_short_bins_are_refilled_evenly():
    # Top bin holds 50 negatives only: it gives all of them, the other two share the rest.
    c = candidates(uniform_ious([3000, 400, 50], 0.0, 0.45), pos_per_gt=(200,))
    pos, neg = run(IoUBalancedSampler(), c, 512, 0.25)
    assert_valid(c, pos, neg, 512, 0.25)
    # 384 negatives (512 - 128 positives): the top bin gives its 50, the others share 334.
    assert bin_counts(c["ious"][neg], negative_pool(c), 3) == [167, 167, 50]


@pytest.mark.parametrize("num_bins", [2, 5])
def test_other_bin_counts_are_flat(num_bins):
    counts = [2000 // (b + 1) for b in range(num_bins)]
    c = candidates(uniform_ious(counts, 0.05, 0.5), pos_per_gt=(10,))
    pos, neg = run(IoUBalancedSampler(num_bins=num_bins), c, 310, 0.25)
    assert_valid(c, pos, neg, 310, 0.25)
    hist = bin_counts(c["ious"][neg], negative_pool(c), num_bins)
    assert max(hist) - min(hist) <= 1 and sum(hist) == 300
    # Leftover samples (300 % num_bins) go to the highest-IoU bins first.
    assert hist == sorted(hist)


def test_one_bin_matches_the_random_sampler():
    c = candidates(uniform_ious([1500, 300, 100, 50, 20], 0.0, 0.5), pos_per_gt=(30, 30))
    edges = torch.linspace(0.0, 0.5, 6)
    runs = 300
    hists = {}
    for name, sampler in [("iou", IoUBalancedSampler(num_bins=1, positives="random")),
                          ("random", RandomSampler())]:
        total = torch.zeros(5)
        for seed in range(runs):
            torch.manual_seed(seed)
            _, neg = run(sampler, c, 256, 0.25)
            total += torch.histogram(c["ious"][neg], edges).hist
        hists[name] = total / runs
    n = 1970
    k = 256 - 60
    expected = torch.tensor([1500, 300, 100, 50, 20]) * k / n
    # Hypergeometric standard error of each bin's mean count over the runs.
    p = torch.tensor([1500, 300, 100, 50, 20]) / n
    se = (k * p * (1 - p) * (n - k) / (n - 1) / runs).sqrt()
    for name in hists:
        assert ((hists[name] - expected).abs() < 4 * se).all(), (name, hists[name], expected)
    assert ((hists["iou"] - hists["random"]).abs() < 5 * se).all()


def test_floor_group_gets_its_fraction():
    # Floor: IoU < 0.05 (2000 of them); 25% of the negative quota goes there, the rest is binned
    # over the other negatives' own range [0.05, 0.5).
    ious = torch.cat([uniform_ious([2000], 0.0, 0.05), uniform_ious([600, 300, 200], 0.05, 0.5, 1)])
    c = candidates(ious, pos_per_gt=(5,))
    sampler = IoUBalancedSampler(floor_thresh=0.05, floor_fraction=0.25)
    pos, neg = run(sampler, c, 405, 0.25)
    assert_valid(c, pos, neg, 405, 0.25)
    neg_iou = c["ious"][neg]
    floor = neg_iou < 0.05
    assert int(floor.sum()) == 400 - int(400 * 0.75)
    rest = c["ious"][(c["labels"] == BG) & (c["ious"] >= 0.05)]
    assert bin_counts(neg_iou[~floor], rest, 3) == [100, 100, 100]
    # Few binned negatives: the floor refills their shortfall.
    c = candidates(torch.cat([uniform_ious([2000], 0.0, 0.05), torch.full((30,), 0.3)]))
    _, neg = run(sampler, c, 400, 0.25)
    assert neg.numel() == 400 and int((c["ious"][neg] >= 0.05).sum()) == 30


@pytest.mark.parametrize("name", ["IoUBalancedSampler", "InstanceBalancedSampler", "mmdet"])
@pytest.mark.parametrize("case", ["no_gt", "no_positives", "few_candidates", "all_ignored",
                                  "all_equal", "empty"])
def test_degenerate_inputs(name, case):
    sampler = (IoUBalancedSampler(mmdet_compat=True) if name == "mmdet"
               else SAMPLER_REGISTRY.get(name)())
    if case == "no_gt":  # the matcher gives IoU 0 everywhere, every candidate background
        c = candidates(torch.zeros(700))
        c["num_gt"] = 0
    elif case == "no_positives":
        c = candidates(uniform_ious([300, 200], 0.0, 0.4))
    elif case == "few_candidates":
        c = candidates(uniform_ious([20, 5], 0.0, 0.4), pos_per_gt=(3, 1))
    elif case == "all_ignored":
        c = candidates([], ignored=50)
    elif case == "all_equal":
        c = candidates(torch.full((900,), 0.2), pos_per_gt=(300,))
    else:
        c = candidates([])
    for _ in range(2):  # twice: the mmdetection mode changes state after its first call
        pos, neg = run(sampler, c, 128, 0.25)
        assert_valid(c, pos, neg, 128, 0.25)
        assert pos.dtype == torch.int64 and neg.dtype == torch.int64


def test_reproducible_under_a_seed():
    c = candidates(uniform_ious([2000, 300, 80], 0.0, 0.5), pos_per_gt=(100, 50, 9))
    sampler = IoUBalancedSampler()
    results = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        results.append(run(sampler, c, 512, 0.25))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][1].sort().values, results[2][1].sort().values)


# ---------------------------------------------------------------------------------------------
# mmdetection compatibility (MMDET_COMPAT)
# ---------------------------------------------------------------------------------------------
def test_mmdet_compat_bins_span_all_candidates():
    # 300 negatives in each third of [0, 0.5); positives up to IoU 1 (GT boxes as proposals).
    c = candidates(uniform_ious([300, 300, 300], 0.0, 0.5), pos_per_gt=(20, 20))
    paper, compat = IoUBalancedSampler(), IoUBalancedSampler(mmdet_compat=True)
    top_third = []
    for seed in range(200):
        torch.manual_seed(seed)
        _, neg = run(paper, c, 120, 0.25)
        assert bin_counts(c["ious"][neg], negative_pool(c), 3) == [30, 30, 30]
        pos, neg = run(compat, c, 120, 0.25)
        assert_valid(c, pos, neg, 120, 0.25)
        top_third.append(int((c["ious"][neg] >= 1 / 3).sum()))
    # mmdetection: bins [0, 1/3), [1/3, 2/3), [2/3, 1] of the max IoU (1.0); 30 per bin, the
    # empty top bin's 30 drawn uniformly from the 570 + 270 left: 30 + 30 * 270 / 840 in
    # [1/3, 1/2).
    expected = 30 + 30 * 270 / 840
    mean = sum(top_third) / len(top_third)
    assert abs(mean - expected) < 1.0, (mean, expected)


def test_mmdet_compat_floor_thresh_rewritten_after_first_call():
    # 500 negatives with IoU exactly 0, 300 with IoU in (0, 0.5); positives up to IoU 1.
    ious = torch.cat([torch.zeros(500), uniform_ious([300], 0.0, 0.5)])
    c = candidates(ious, pos_per_gt=(20, 20))
    compat, paper = IoUBalancedSampler(mmdet_compat=True), IoUBalancedSampler()
    assert compat.floor_thresh == -1.0
    zeros_compat, zeros_paper = [], []
    for seed in range(10):
        torch.manual_seed(seed)
        _, neg = run(compat, c, 120, 0.25)
        zeros_compat.append(int((c["ious"][neg] == 0).sum()))
        _, neg = run(paper, c, 120, 0.25)
        zeros_paper.append(int((c["ious"][neg] == 0).sum()))
    # First call: zero-IoU negatives are binned with the others; afterwards never sampled as
    # long as the IoU > 0 negatives fill the quota (90 <= 300).
    assert zeros_compat[0] > 5 and zeros_compat[1:] == [0] * 9
    assert compat._mmdet_floor_thresh == 0.0
    # Paper behaviour: zero-IoU negatives are part of the lowest bin in every call.
    assert min(zeros_paper) > 5
    # Too few IoU > 0 negatives: the zero-IoU ones fill the rest (floor group).
    c = candidates(torch.cat([torch.zeros(500), torch.full((40,), 0.25)]), pos_per_gt=(20, 20))
    _, neg = run(compat, c, 120, 0.25)
    assert int((c["ious"][neg] == 0).sum()) == 50 and int((c["ious"][neg] > 0).sum()) == 40


def test_mmdet_compat_positive_floor_thresh():
    ious = torch.cat([uniform_ious([1000], 0.0, 0.1), uniform_ious([500], 0.1, 0.5, 1)])
    c = candidates(ious, pos_per_gt=(10,))
    sampler = IoUBalancedSampler(mmdet_compat=True, floor_thresh=0.1, floor_fraction=0.5)
    _, neg = run(sampler, c, 100, 0.25)
    assert neg.numel() == 90 and int((c["ious"][neg] < 0.1).sum()) == 90 - int(90 * 0.5)
    assert sampler._mmdet_floor_thresh == 0.1


# ---------------------------------------------------------------------------------------------
# Instance-balanced positives
# ---------------------------------------------------------------------------------------------
def test_positives_are_balanced_per_ground_truth():
    c = candidates(uniform_ious([1000], 0.0, 0.5), pos_per_gt=(100, 30, 10, 5))
    extra_goes_to = set()
    for name in ("IoUBalancedSampler", "InstanceBalancedSampler"):
        for seed in range(12):
            torch.manual_seed(seed)
            pos, neg = run(SAMPLER_REGISTRY.get(name)(), c, 256, 0.25)
            assert_valid(c, pos, neg, 256, 0.25)
            per_gt = torch.bincount(c["gt_index"][pos], minlength=4).tolist()
            # Quota 64: GT 3 and 2 give all they have, the other two share 49.
            assert per_gt[2:] == [10, 5] and sorted(per_gt[:2]) == [24, 25]
            extra_goes_to.add(per_gt.index(25))
    assert extra_goes_to == {0, 1}  # the odd one out is drawn at random
    # Abundant positives: 5 boxes share 128 as 26, 26, 26, 25, 25.
    c = candidates(uniform_ious([1000], 0.0, 0.5), pos_per_gt=(100, 300, 150, 200, 129))
    pos, _ = run(IoUBalancedSampler(), c, 512, 0.25)
    assert sorted(torch.bincount(c["gt_index"][pos]).tolist()) == [25, 25, 26, 26, 26]
    # Random positives follow the pool instead (GT 1: 300 of 879 -> ~44 of 128).
    pos, _ = run(IoUBalancedSampler(positives="random"), c, 512, 0.25)
    assert torch.bincount(c["gt_index"][pos])[1] > 30


# ---------------------------------------------------------------------------------------------
# Detectron2's random sampling: exact by default
# ---------------------------------------------------------------------------------------------
def test_random_sampler_is_subsample_labels():
    c = candidates(uniform_ious([700, 100], 0.0, 0.5), pos_per_gt=(90, 10), ignored=30)
    torch.manual_seed(5)
    ours = run(RandomSampler(), c, 256, 0.25)
    torch.manual_seed(5)
    stock = subsample_labels(c["labels"], 256, 0.25, BG)
    assert all(torch.equal(a, b) for a, b in zip(ours, stock))


def tiny_cfg(*opts, mask=False):
    cfg = get_config("Shapes-Detection/faster_rcnn_small_R_FPN.yaml", *opts)
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.MASK_ON = mask
    return cfg


LIBRA_HEADS = ("MODEL.ROI_HEADS.NAME", "LibraGHMROIHeads",
               "MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN")


def build_seeded(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg).train()


def rpn_inputs(model, batch):
    """Images, targets, backbone features and anchors of a batch, for the proposal generator."""
    images = model.preprocess_image(batch)
    targets = [x["instances"] for x in batch]
    features = model.backbone(images.tensor)
    rpn = model.proposal_generator
    anchors = rpn.anchor_generator([features[f] for f in rpn.in_features])
    return images, targets, features, anchors


def test_default_sampler_reproduces_stock_heads_exactly():
    stock_cfg = tiny_cfg()
    libra_cfg = tiny_cfg(*LIBRA_HEADS)
    assert libra_cfg.MODEL.ROI_HEADS.SAMPLER == "RandomSampler"
    assert libra_cfg.MODEL.RPN.SAMPLER == "RandomSampler"
    assert libra_cfg.MODEL.RPN.OBJECTNESS_LOSS_TYPE == "bce"
    stock = build_seeded(stock_cfg)
    libra = build_seeded(libra_cfg)
    # Same seed, same initial weights (LibraGHM's parts draw no random numbers of the stock ones).
    want_state, got_state = stock.state_dict(), libra.state_dict()
    assert want_state.keys() == got_state.keys()
    assert all(torch.equal(want_state[k], got_state[k]) for k in want_state)
    assert type(libra.roi_heads).__name__ == "LibraGHMROIHeads"
    assert type(libra.proposal_generator).__name__ == "LibraGHMRPN"
    assert isinstance(libra.roi_heads.sampler, RandomSampler)
    assert isinstance(libra.proposal_generator.sampler, RandomSampler)
    batch = tiny_batch(2, with_gt=(True, False))
    # Sampled anchors and proposals, index for index.
    images, targets, features, anchors = rpn_inputs(stock, batch)
    torch.manual_seed(1)
    want = stock.proposal_generator.label_and_sample_anchors(anchors, targets)
    torch.manual_seed(1)
    got = libra.proposal_generator.label_and_sample_anchors(anchors, targets)
    for a, b in zip(want[0], got[0]):
        assert torch.equal(a, b)
    proposals = []
    for i, t in enumerate(targets):  # random boxes, and boxes jittered around the GT ones
        xy = torch.rand(60, 2) * 100
        boxes = torch.cat([xy, xy + 8 + torch.rand(60, 2) * 50])
        if len(t):
            near = t.gt_boxes.tensor.repeat(10, 1)
            boxes = torch.cat([boxes.view(-1, 4), near + torch.randn_like(near) * 3])
        proposals.append(Instances(images.image_sizes[i], proposal_boxes=Boxes(boxes.view(-1, 4)),
                                   objectness_logits=torch.zeros(len(boxes.view(-1, 4)))))
    with EventStorage():
        torch.manual_seed(2)
        want = stock.roi_heads.label_and_sample_proposals(proposals, targets)
        torch.manual_seed(2)
        got = libra.roi_heads.label_and_sample_proposals(proposals, targets)
        for a, b in zip(want, got):
            assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
            assert torch.equal(a.gt_classes, b.gt_classes)
        assert int((want[0].gt_classes < 5).sum()) > 0  # foreground was sampled too
        # Whole training losses, bit for bit.
        torch.manual_seed(3)
        want = stock(batch)
        torch.manual_seed(3)
        got = libra(batch)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


# ---------------------------------------------------------------------------------------------
# The heads with the IoU-balanced sampler
# ---------------------------------------------------------------------------------------------
def test_recording_matcher_is_the_stock_matcher():
    stock = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)
    rec = IoURecordingMatcher.from_matcher(stock)
    iou = torch.rand(4, 300) ** 3
    for a, b in zip(stock(iou), rec(iou)):
        assert torch.equal(a, b)
    assert torch.equal(rec.last_match.ious, iou.max(0).values) and rec.last_match.num_gt == 4
    for a, b in zip(stock(iou[:0]), rec(iou[:0])):
        assert torch.equal(a, b)
    assert torch.equal(rec.last_match.ious, torch.zeros(300)) and rec.last_match.num_gt == 0


def test_rpn_samples_anchors_iou_balanced():
    cfg = tiny_cfg("MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN",
                   "MODEL.RPN.SAMPLER", "IoUBalancedSampler")
    model = build_model(cfg).train()
    assert isinstance(model.proposal_generator.anchor_matcher, IoURecordingMatcher)
    _, targets, _, anchors = rpn_inputs(model, tiny_batch(2))
    labels, _ = model.proposal_generator.label_and_sample_anchors(anchors, targets)
    all_anchors = Boxes.cat(anchors)
    for lab, t in zip(labels, targets):
        iou = pairwise_iou(t.gt_boxes, all_anchors).max(0).values
        stock_labels = Matcher([0.3, 0.7], [0, -1, 1], True)(
            pairwise_iou(t.gt_boxes, all_anchors))[1]
        n_pos = int((stock_labels == 1).sum())
        assert int((lab == 1).sum()) == min(n_pos, 64)
        assert int((lab == 0).sum()) == 128 - min(n_pos, 64)
        assert bool((stock_labels[lab == 0] == 0).all() and (stock_labels[lab == 1] == 1).all())
        hist = bin_counts(iou[lab == 0], iou[stock_labels == 0], 3)
        assert max(hist) - min(hist) <= 1, hist  # the pool has enough in every bin


RPN_SAMPLERS = ["RandomSampler", "IoUBalancedSampler", "InstanceBalancedSampler", "NoSampling"]


@pytest.mark.parametrize("objectness", ["bce", "ghm_c"])
@pytest.mark.parametrize("sampler", RPN_SAMPLERS)
def test_libraghm_rpn_with_every_sampler(sampler, objectness):
    cfg = tiny_cfg("MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.SAMPLER", sampler,
                   "MODEL.RPN.OBJECTNESS_LOSS_TYPE", objectness)
    model = build_seeded(cfg)
    rpn = model.proposal_generator
    assert type(rpn.sampler).__name__ == sampler
    assert type(rpn.objectness_loss) is CLASSIFICATION_LOSS_REGISTRY.get(objectness)
    batch = tiny_batch(2, with_gt=(True, False))  # second image: no ground truth
    _, targets, features, anchors = rpn_inputs(model, batch)
    all_anchors = Boxes.cat(anchors)
    torch.manual_seed(1)
    labels, gt_boxes = rpn.label_and_sample_anchors(anchors, targets)
    for lab, t in zip(labels, targets):
        # What Detectron2's anchor matcher labels (1 fg, 0 bg, -1 ignore) before sampling.
        matched = Matcher([0.3, 0.7], [0, -1, 1], True)(pairwise_iou(t.gt_boxes, all_anchors))[1]
        if len(t) == 0:
            matched = torch.zeros_like(matched)
        assert bool((matched[lab == 1] == 1).all() and (matched[lab == 0] == 0).all())
        n_pos, n_neg = int((matched == 1).sum()), int((matched == 0).sum())
        if sampler == "NoSampling":  # every valid anchor, none dropped
            assert torch.equal(lab, matched.to(lab.dtype))
        else:
            want_pos = min(n_pos, 64)
            assert int((lab == 1).sum()) == want_pos
            assert int((lab == 0).sum()) == min(n_neg, 128 - want_pos)
    assert int((labels[0] == 1).sum()) > 0 and int((labels[1] == 1).sum()) == 0
    # The RPN's losses on these labels; "bce" by hand: summed over the anchors kept, divided by
    # BATCH_SIZE_PER_IMAGE x images as Detectron2's.
    logits, deltas = rpn.rpn_head([features[f] for f in rpn.in_features])
    logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
    deltas = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2)
              .flatten(1, -2) for x in deltas]
    state = {k: v.clone() for k, v in rpn.objectness_loss.state_dict().items()}
    with EventStorage():
        losses = rpn.losses(anchors, logits, labels, deltas, gt_boxes)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) and float(v) > 0 for v in losses.values())
    lab, x = torch.stack(labels), torch.cat(logits, dim=1).detach()
    if objectness == "bce":
        valid = lab >= 0
        want = F.binary_cross_entropy_with_logits(x[valid], (lab[valid] == 1).float(),
                                                  reduction="sum") / (128 * 2)
        assert torch.allclose(losses["loss_rpn_cls"], want, rtol=1e-5)
    else:  # GHM-C counted every sampled anchor: one update of the moving average
        assert int(rpn.objectness_loss.num_updates.max()) == 1
        assert not torch.equal(state["acc_count"], rpn.objectness_loss.acc_count)
        m = rpn.objectness_loss.momentum
        assert float(rpn.objectness_loss.acc_count.sum()) == pytest.approx(
            (1 - m) * int((lab >= 0).sum()))
    # Gradients reach the RPN head and the backbone, finite.
    sum(losses.values()).backward()
    grads = [p.grad for p in rpn.parameters()] + [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(rpn.rpn_head.objectness_logits.weight.grad.abs().sum()) > 0


def test_libraghm_rpn_random_bce_smooth_l1_is_the_stock_rpn():
    opts = ("MODEL.RPN.SAMPLER", "RandomSampler", "MODEL.RPN.OBJECTNESS_LOSS_TYPE", "bce",
            "MODEL.RPN.BBOX_REG_LOSS_TYPE", "smooth_l1", "MODEL.RPN.SMOOTH_L1_BETA", 0.1)
    stock = build_seeded(tiny_cfg(*opts))
    libra = build_seeded(tiny_cfg("MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", *opts))
    assert type(stock.proposal_generator).__name__ == "RPN"
    want_state, got_state = stock.state_dict(), libra.state_dict()
    assert all(torch.equal(want_state[k], got_state[k]) for k in want_state)
    assert want_state.keys() == got_state.keys()
    batch = tiny_batch(3, with_gt=(True, False, True))
    images, targets, features, _ = rpn_inputs(stock, batch)
    out = {}
    for name, model in (("stock", stock), ("libra", libra)):
        with EventStorage():
            torch.manual_seed(4)
            out[name] = model.proposal_generator(images, features, targets)
    (want_props, want), (got_props, got) = out["stock"], out["libra"]
    assert want.keys() == got.keys() == {"loss_rpn_cls", "loss_rpn_loc"}
    for k in want:
        assert torch.equal(want[k], got[k]), k
    for a, b in zip(want_props, got_props):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)


@pytest.mark.parametrize("mask", [False, True])
def test_libra_heads_train_a_step(mask):
    cfg = tiny_cfg(*LIBRA_HEADS, "MODEL.ROI_HEADS.SAMPLER", "IoUBalancedSampler",
                   "MODEL.RPN.SAMPLER", "IoUBalancedSampler", mask=mask)
    model = build_model(cfg).train()
    heads = model.roi_heads
    assert isinstance(heads.sampler, IoUBalancedSampler)
    assert isinstance(model.proposal_generator.sampler, IoUBalancedSampler)
    sampled = []
    label_and_sample = heads.label_and_sample_proposals

    def recording(proposals, targets):
        out = label_and_sample(proposals, targets)
        sampled.extend(out)
        return out

    heads.label_and_sample_proposals = recording
    mask_inputs = []
    if mask:
        heads.mask_head.register_forward_hook(lambda mod, args, out: mask_inputs.append(args[1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with EventStorage():
        losses = model(tiny_batch(2, with_gt=(True, False)))
    assert (("loss_mask" in losses) == mask) and len(losses) == 4 + mask
    for k, v in losses.items():
        assert torch.isfinite(v), (k, v)
    total = sum(losses.values())
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    fg = [s[s.gt_classes < 5] for s in sampled]
    assert len(fg[0]) > 0 and len(fg[1]) == 0  # the second image has no GT
    assert len(sampled[0]) == len(sampled[1]) == 32
    if mask:  # the mask head trains on exactly the sampled positives, image by image
        assert float(losses["loss_mask"]) > 0
        assert len(mask_inputs) == 1 and len(mask_inputs[0]) == 2
        for got, want in zip(mask_inputs[0], fg):
            assert torch.equal(got.proposal_boxes.tensor, want.proposal_boxes.tensor)
            assert torch.equal(got.gt_classes, want.gt_classes)


# ---------------------------------------------------------------------------------------------
# Config validation at build time
# ---------------------------------------------------------------------------------------------
IOU_PARAMS = IoUBalancedSampler.PARAMS


@pytest.mark.parametrize("key,value,spec", [
    ("MODEL.ROI_HEADS.SAMPLER", "NoSuchSampler", None),
    ("MODEL.RPN.SAMPLER", "NoSuchSampler", None),
    ("MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.NUM_BINS", 0, IOU_PARAMS["num_bins"]),
    ("MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.NUM_BINS", 2.0, IOU_PARAMS["num_bins"]),
    ("MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.FLOOR_FRACTION", 1.5, IOU_PARAMS["floor_fraction"]),
    ("MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.FLOOR_FRACTION", -0.1, IOU_PARAMS["floor_fraction"]),
    ("MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.FLOOR_THRESH", 1.0, IOU_PARAMS["floor_thresh"]),
    ("MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.POSITIVES", "some", IOU_PARAMS["positives"]),
    ("MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.MMDET_COMPAT", 1, IOU_PARAMS["mmdet_compat"]),
    ("MODEL.RPN.IOU_BALANCED_SAMPLER.NUM_BINS", -2, IOU_PARAMS["num_bins"]),
    ("MODEL.ROI_HEADS.POSITIVE_FRACTION", 1.5, SAMPLING_PARAMS["positive_fraction"]),
    ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 0, SAMPLING_PARAMS["batch_size_per_image"]),
    ("MODEL.RPN.POSITIVE_FRACTION", -0.5, SAMPLING_PARAMS["positive_fraction"]),
    ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 0, SAMPLING_PARAMS["batch_size_per_image"]),
])
def test_invalid_config_fails_at_build_time(key, value, spec):
    cfg = tiny_cfg(*LIBRA_HEADS, "MODEL.ROI_HEADS.SAMPLER", "IoUBalancedSampler",
                   "MODEL.RPN.SAMPLER", "IoUBalancedSampler")
    node, leaf = key.rsplit(".", 1)
    cfg_node(cfg, node)[leaf] = value
    assert spec is None or not spec.is_valid(value)  # the PARAMS table is the oracle
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    msg = str(err.value)
    assert f"{key} = {value!r} is invalid" in msg, msg
    if spec is not None:
        assert spec.describe() in msg, msg
    else:  # an unknown sampler: the message lists the registered ones
        for name in ("IoUBalancedSampler", "InstanceBalancedSampler", "NoSampling",
                     "OHEMSampler", "RandomSampler"):
            assert name in msg, msg


def test_rpn_constructor_refuses_ohem_sampler():
    cfg = tiny_cfg("MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN")
    shapes = build_model(cfg).backbone.output_shape()
    kwargs = LibraGHMRPN.from_config(cfg, shapes)
    kwargs["sampler"] = OHEMSampler()
    with pytest.raises(ValueError) as err:
        LibraGHMRPN(**kwargs)
    assert "OHEMSampler" in str(err.value) and "ROI heads only" in str(err.value)


def test_ohem_sampler_is_refused_in_the_rpn_at_build():
    cfg = tiny_cfg("MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN",
                   "MODEL.RPN.SAMPLER", "OHEMSampler")
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    msg = str(err.value)
    assert "MODEL.RPN.SAMPLER = 'OHEMSampler' is invalid" in msg and "MODEL.ROI_HEADS" in msg, msg


@pytest.mark.parametrize("old,words", [
    ("LibraROIHeads", ["LibraGHMROIHeads", "MODEL.ROI_HEADS.SAMPLER"]),
])
def test_old_head_names_fail_naming_the_replacement(old, words):
    cfg = tiny_cfg("MODEL.ROI_HEADS.NAME", old)
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    for w in [repr(old)] + words:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize("old,new", [
    ("LIBRAGHM.ROI_SAMPLER.NAME", "MODEL.ROI_HEADS.SAMPLER"),
    ("LIBRAGHM.RPN_SAMPLER.NAME", "MODEL.RPN.SAMPLER"),
    ("LIBRAGHM.ROI_SAMPLER.NUM_BINS", "MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.NUM_BINS"),
    ("LIBRAGHM.RPN_SAMPLER.POSITIVES", "MODEL.RPN.IOU_BALANCED_SAMPLER.POSITIVES"),
])
def test_old_sampler_keys_fail_naming_the_new_key(old, new, tmp_path):
    cfg = tiny_cfg()
    with pytest.raises(KeyError) as err:
        cfg.merge_from_list([old, "IoUBalancedSampler"])
    assert old in str(err.value) and new in str(err.value), str(err.value)
    # The same from a yaml file: the old node itself is reported, with both of its new homes.
    node, leaf = old.split(".")[1:]
    path = tmp_path / "old.yaml"
    path.write_text(f"LIBRAGHM:\n  {node}:\n    {leaf}: IoUBalancedSampler\n")
    with pytest.raises(KeyError) as err:
        tiny_cfg().merge_from_file(str(path))
    head = new.split(".")[1]
    for key in (f"LIBRAGHM.{node}", f"MODEL.{head}.SAMPLER", f"MODEL.{head}.IOU_BALANCED_SAMPLER"):
        assert key in str(err.value), str(err.value)


def test_every_config_key_is_read():
    cfg = tiny_cfg("MODEL.ROI_HEADS.SAMPLER", "IoUBalancedSampler",
                   "MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.NUM_BINS", 5,
                   "MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.FLOOR_THRESH", 0.1,
                   "MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.FLOOR_FRACTION", 0.3,
                   "MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.POSITIVES", "random",
                   "MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER.MMDET_COMPAT", True,
                   "MODEL.RPN.IOU_BALANCED_SAMPLER.NUM_BINS", 7)
    s = build_sampler(cfg, "MODEL.ROI_HEADS")
    assert isinstance(s, IoUBalancedSampler)
    assert (s.num_bins, s.floor_thresh, s.floor_fraction, s.positives, s.mmdet_compat) == (
        5, 0.1, 0.3, "random", True)
    assert isinstance(build_sampler(cfg, "MODEL.RPN"), RandomSampler)
    # The RPN's sampler reads its own node, not the ROI heads'.
    cfg.MODEL.RPN.SAMPLER = "IoUBalancedSampler"
    r = build_sampler(cfg, "MODEL.RPN")
    assert (r.num_bins, r.floor_thresh, r.positives, r.mmdet_compat) == (
        7, -1.0, "instance_balanced", False)
    for name in RPN_SAMPLERS:
        cfg.MODEL.ROI_HEADS.SAMPLER = name
        assert type(build_sampler(cfg, "MODEL.ROI_HEADS")) is SAMPLER_REGISTRY.get(name)


def test_no_sampling_keeps_every_labelled_candidate():
    c = candidates(uniform_ious([300, 100], 0.0, 0.5), pos_per_gt=(40, 9), ignored=25)
    pos, neg = run(NoSampling(), c, 64, 0.25)
    labels = c["labels"]
    assert pos.tolist() == torch.nonzero((labels != BG) & (labels != -1)).squeeze(1).tolist()
    assert neg.tolist() == torch.nonzero(labels == BG).squeeze(1).tolist()
    idx = NoSampling().sample_proposals(labels, 64, 0.25, BG)
    assert idx.tolist() == torch.nonzero(labels != -1).squeeze(1).tolist()


# ---------------------------------------------------------------------------------------------
# No host synchronisation per bin or per box; compiled and plain-Python code agree
# ---------------------------------------------------------------------------------------------
_CENSUS = r"""
import json, sys, torch
from torch.overrides import TorchFunctionMode
sys.path.insert(0, {path!r})
from libraghm.sampling import IoUBalancedSampler, InstanceBalancedSampler

SYNCING = {{"nonzero", "item", "tolist", "__bool__", "__int__", "__float__", "__index__",
           "numpy", "cpu", "unique", "bincount", "any", "all", "argwhere", "masked_select",
           "nonzero_static", "repeat_interleave"}}

class Census(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {{}}))

out = {{}}
for num_bins, num_gt, compat in [(3, 3, False), (12, 40, False), (3, 3, True), (12, 40, True)]:
    g = torch.Generator().manual_seed(0)
    n = 5000
    labels = torch.full((n,), 80)
    labels[:600] = torch.randint(0, 80, (600,), generator=g)
    labels[600:700] = -1
    ious = torch.rand(n, generator=g) * 0.5
    ious[:600] += 0.5
    gt_index = torch.randint(0, num_gt, (n,), generator=g)
    for name, sampler in [("iou", IoUBalancedSampler(num_bins=num_bins, mmdet_compat=compat)),
                          ("inst", InstanceBalancedSampler())]:
        torch.manual_seed(0)
        with Census() as census:
            pos, neg = sampler(labels, 512, 0.25, 80, ious=ious, gt_index=gt_index, num_gt=num_gt)
        key = f"{{name}}-{{num_bins}}-{{num_gt}}-{{compat}}"
        out[key] = dict(syncs=[c for c in census.names if c in SYNCING],
                        pos=pos.tolist(), neg=neg.tolist())
print(json.dumps(out))
"""


def test_no_sync_per_bin_or_box_and_compiled_code_agrees():
    code = _CENSUS.format(path=os.path.join(REPO, "projects", "LibraGHM"))
    env = dict(os.environ, PYTORCH_JIT="0")  # plain Python: every torch call is visible
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    eager = json.loads(res.stdout.strip().splitlines()[-1])
    for key, r in eager.items():
        # Exactly the two nonzero calls subsample_labels also makes (whatever the number of
        # bins or boxes); nothing else waits for the device.
        assert r["syncs"] == ["nonzero", "nonzero"], (key, r["syncs"])
    # The TorchScript-compiled functions used here draw and choose exactly the same.
    g = torch.Generator().manual_seed(0)
    for num_bins, num_gt, compat in [(3, 3, False), (12, 40, False), (3, 3, True), (12, 40, True)]:
        g = torch.Generator().manual_seed(0)
        n = 5000
        labels = torch.full((n,), 80)
        labels[:600] = torch.randint(0, 80, (600,), generator=g)
        labels[600:700] = -1
        ious = torch.rand(n, generator=g) * 0.5
        ious[:600] += 0.5
        gt_index = torch.randint(0, num_gt, (n,), generator=g)
        for name, sampler in [("iou", IoUBalancedSampler(num_bins=num_bins, mmdet_compat=compat)),
                              ("inst", InstanceBalancedSampler())]:
            torch.manual_seed(0)
            pos, neg = sampler(labels, 512, 0.25, 80, ious=ious, gt_index=gt_index,
                               num_gt=num_gt)
            r = eager[f"{name}-{num_bins}-{num_gt}-{compat}"]
            assert pos.tolist() == r["pos"] and neg.tolist() == r["neg"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [{}, {"floor_thresh": 0.05, "floor_fraction": 0.3},
                                    {"mmdet_compat": True}])
def test_iou_balanced_sampler_with_half_precision_ious(dtype, kwargs):
    """Half-precision IoUs (mixed-precision matching) sample exactly what their float32 values do;
    the bin index never leaves [0, K) (the 1e-6 margin is below half precision's resolution)."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        n = 300
        labels = torch.where(torch.rand(n, generator=g) < 0.2, torch.randint(0, 5, (n,), generator=g),
                             torch.full((n,), 5))
        ious = torch.rand(n, generator=g).to(dtype)
        ious[:10] = 1.0 - 1e-4  # values that round to the top of the range
        gt_index = torch.randint(0, 4, (n,), generator=g)
        out = {}
        for name, values in (("half", ious), ("float", ious.float())):
            torch.manual_seed(seed)
            pos, neg = IoUBalancedSampler(**kwargs)(labels, 64, 0.25, 5, ious=values,
                                                   gt_index=gt_index, num_gt=4)
            out[name] = (pos.tolist(), neg.tolist())
        assert out["half"] == out["float"]
        assert all(0 <= i < n for i in out["half"][0] + out["half"][1])
