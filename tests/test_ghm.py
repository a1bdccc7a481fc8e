"""Tests of GHM-C / GHM-R (libraghm/losses/ghm_loss.py) and of the LibraGHM heads that use them
(LibraGHMRetinaNet with CLS_LOSS_TYPE ghm_c / BBOX_REG_LOSS_TYPE ghm_r, LibraGHMRPN with
OBJECTNESS_LOSS_TYPE ghm_c).

Most loss tests call ``GradientHarmonizer.harmonize(pred, target, label_weight, level_sizes)``
(any shapes); the heads' interfaces (``GHMC.forward``, ``GHMR.forward`` and ``GHMR.per_box``)
are tested against it.
"""
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from libraghm import add_libraghm_config
from libraghm.losses import (
    BOX_REG_LOSS_REGISTRY,
    CLASSIFICATION_LOSS_REGISTRY,
    BalancedL1Loss,
    GradientHarmonizer,
)
from libraghm.losses.box_regression import SmoothL1Loss
from libraghm.losses.classification import BinaryCrossEntropyLoss, SigmoidFocalLoss
from libraghm.losses.ghm_loss import GHMC, GHMR, HARMONIZER_PARAMS, encode_box_deltas
from libraghm.modeling import LibraGHMFastRCNNOutputLayers, LibraGHMRPN, LibraGHMRetinaNet
from libraghm.validation import cfg_node

from conftest import get_config, tiny_batch

M30 = 30


def logits_for_g(g, target):
    """Logits whose GHM-C gradient norm |sigmoid(x) - t| is exactly ``g`` (float64)."""
    p = torch.where(target > 0.5, 1.0 - g, g)
    return torch.logit(p.to(torch.float64))


def bin_centres(bins, counts):
    """Gradient norms at the centres of the bins, ``counts[b]`` of them in bin b."""
    parts = [
        torch.full((int(c),), (b + 0.5) / bins, dtype=torch.float64) for b, c in enumerate(counts)
    ]
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------
# Weights on hand-built histograms
# ------------------------------------------------------------------------------------------------
def test_uniform_histogram_gives_weight_one():
    g = bin_centres(M30, [4] * M30)
    t = (torch.arange(g.numel()) % 3 == 0).to(torch.float64)
    x = logits_for_g(g, t)
    ghm = GHMC(momentum=0.0)
    loss = ghm.harmonize(x, t)
    assert torch.allclose(ghm.last_bin_weights, torch.ones(M30, dtype=torch.float64))
    # beta = 1 everywhere: GHM-C is plain mean BCE.
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(x, t))


def test_half_of_the_samples_in_one_bin():
    # N = 2 * 29 * 4 samples: half in bin 0, the rest spread evenly over the 29 other bins.
    counts = [116] + [4] * 29
    g = bin_centres(M30, counts)
    t = torch.zeros_like(g)
    x = logits_for_g(g, t)
    ghm = GHMC(momentum=0.0)
    loss = ghm.harmonize(x, t)
    n = sum(counts)
    beta = ghm.last_bin_weights
    # beta = N / (M * count): 2/M for the crowded bin, N / (4 M) for the others.
    assert beta[0].item() == pytest.approx(2.0 / M30)
    assert torch.allclose(beta[1:], torch.full((29,), n / (4.0 * M30), dtype=torch.float64))
    expected = (beta[torch.tensor([0] * 116 + sum([[b] * 4 for b in range(1, 30)], []))] *
                F.binary_cross_entropy_with_logits(x, t, reduction="none")).sum() / n
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_two_bins_paper_vs_mmdet_compat():
    # Half the samples in bin 3, half in bin 20, 28 bins empty.
    g = bin_centres(M30, [0, 0, 0, 50] + [0] * 16 + [50] + [0] * 9)
    t = torch.zeros_like(g)
    x = logits_for_g(g, t)
    paper = GHMC(momentum=0.0)
    paper.harmonize(x, t)
    compat = GHMC(momentum=0.0, mmdet_compat=True)
    compat.harmonize(x, t)
    # Paper: N / (M * count) = 2 / M. mmdetection divides by the 2 non-empty bins instead: 1.
    assert paper.last_bin_weights[3].item() == pytest.approx(2.0 / M30)
    assert compat.last_bin_weights[3].item() == pytest.approx(1.0)
    assert compat.last_bin_weights[20].item() == pytest.approx(1.0)


def test_all_samples_in_one_bin():
    g = torch.full((64,), 0.013, dtype=torch.float64)
    t = torch.zeros_like(g)
    x = logits_for_g(g, t)
    ghm = GHMC(momentum=0.0)
    loss = ghm.harmonize(x, t)
    assert ghm.last_bin_weights[0].item() == pytest.approx(1.0 / M30)
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(x, t).item() / M30)
    # GHM-R likewise.
    r = GHMR(momentum=0.0, loss_weight=1.0)
    d = torch.full((16, 4), 5.0, dtype=torch.float64)  # g ~ 0.99998: last bin
    loss_r = r.harmonize(d, torch.zeros_like(d))
    asl1 = math.sqrt(25 + 0.02**2) - 0.02
    assert loss_r.item() == pytest.approx(asl1 / 10)


def test_ghmr_normalised_by_four_times_positives():
    # 8 positives (32 coordinates) spread evenly over the 10 bins... cannot be even; use a uniform
    # histogram of 40 coordinates (4 per bin) so beta = 1, then GHM-R = sum(ASL1) / (4 x positives).
    mu = 0.02
    g = bin_centres(10, [4] * 10)
    d = mu * g / torch.sqrt(1 - g * g)  # inverts g = |d| / sqrt(d^2 + mu^2)
    pred = d.reshape(10, 4)
    target = torch.zeros_like(pred)
    r = GHMR(momentum=0.0, loss_weight=1.0)
    loss = r.harmonize(pred, target)
    assert torch.allclose(r.last_bin_weights, torch.ones(10, dtype=torch.float64))
    asl1 = torch.sqrt(d * d + mu * mu) - mu
    assert loss.item() == pytest.approx((asl1.sum() / 40).item(), rel=1e-9)
    # Default loss weight 10 (RetinaNet).
    assert GHMR(momentum=0.0).harmonize(pred, target).item() == pytest.approx(10 * loss.item(), rel=1e-9)


# ------------------------------------------------------------------------------------------------
# Moving average
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_correction", [True, False])
def test_ema_after_k_steps_matches_recursion(bias_correction):
    m, bins = 0.75, 30
    ghm = GHMC(momentum=m, bias_correction=bias_correction)
    acc = torch.zeros(bins, dtype=torch.float64)
    upd = torch.zeros(bins, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        counts = torch.randint(0, 6, (bins,), generator=gen).to(torch.float64)
        counts[step] = 0  # some bin empty at every step
        g = bin_centres(bins, counts.tolist())
        t = torch.zeros_like(g)
        ghm.harmonize(logits_for_g(g, t), t)
        present = counts > 0
        acc = torch.where(present, m * acc + (1 - m) * counts, acc)  # empty bins are not decayed
        upd += present
        assert torch.allclose(ghm.acc_count, acc)
        assert torch.equal(ghm.num_updates, upd.long())
        s = acc / (1 - m ** upd) if bias_correction else acc
        beta = counts.sum() / (bins * s)
        assert torch.allclose(ghm.last_bin_weights[present], beta[present])


def test_bias_correction_and_mmdet_first_step():
    g = bin_centres(M30, [10] * M30)
    t = torch.zeros_like(g)
    x = logits_for_g(g, t)
    corrected = GHMC(momentum=0.75, bias_correction=True)
    corrected.harmonize(x, t)
    compat = GHMC(momentum=0.75, mmdet_compat=True)
    compat.harmonize(x, t)
    # Bias correction: the first step already sees the true density (beta = 1 for a uniform
    # histogram); mmdetection's average starts at 0: weights 1 / (1 - 0.75) = 4x too large.
    assert torch.allclose(corrected.last_bin_weights, torch.ones(M30, dtype=torch.float64))
    assert torch.allclose(compat.last_bin_weights, torch.full((M30,), 4.0, dtype=torch.float64))


def test_default_is_the_paper_moving_average_from_zero():
    """BIAS_CORRECTION defaults to False (the paper and its authors' code): the average starts at
    zero uncorrected, so the first weights of a bin are 1/(1-m) times its count-only weight, the
    second ones (same histogram) 1/(1-m^2) times; only bins that hold samples are updated."""
    cfg = get_cfg()
    add_libraghm_config(cfg)
    assert cfg.MODEL.GHM_C.BIAS_CORRECTION is False and cfg.MODEL.GHM_R.BIAS_CORRECTION is False
    for cls in (GHMC, GHMR):
        assert cls().bias_correction is False and cls.from_config(cfg).bias_correction is False
    # GHM-C, uneven histogram with empty bins.
    counts = torch.tensor([9, 0, 3, 1, 0, 7] + [0, 2] * 12, dtype=torch.float64)
    g = bin_centres(M30, counts.tolist())
    t = torch.zeros_like(g)
    x = logits_for_g(g, t)
    present = counts > 0
    count_only = GHMC(momentum=0.0)
    ref_loss = count_only.harmonize(x, t)
    ref = count_only.last_bin_weights
    assert torch.allclose(ref[present], counts.sum() / (M30 * counts[present]))
    default = GHMC()
    m = default.momentum
    loss = default.harmonize(x, t)
    assert torch.allclose(default.acc_count, (1 - m) * counts)  # empty bins stay at 0
    assert torch.equal(default.num_updates, present.long())
    assert torch.allclose(default.last_bin_weights[present], ref[present] / (1 - m))
    assert loss.item() == pytest.approx(ref_loss.item() / (1 - m), rel=1e-12)
    default.harmonize(x, t)
    assert torch.allclose(default.last_bin_weights[present], ref[present] / (1 - m * m))
    # GHM-R likewise (momentum 0.7).
    r_counts = [4, 0, 1, 6, 0, 0, 2, 0, 0, 3]
    gr = bin_centres(10, r_counts)
    d = (0.02 * gr / torch.sqrt(1 - gr * gr)).reshape(-1, 4)  # inverts g = |d| / sqrt(d^2 + mu^2)
    r_ref, r_def = GHMR(momentum=0.0), GHMR()
    lr_ref = r_ref.harmonize(d, torch.zeros_like(d))
    lr_def = r_def.harmonize(d, torch.zeros_like(d))
    keep = torch.tensor(r_counts) > 0
    assert torch.allclose(r_def.last_bin_weights[keep], r_ref.last_bin_weights[keep] / (1 - 0.7))
    assert lr_def.item() == pytest.approx(lr_ref.item() / (1 - 0.7), rel=1e-12)


def test_eval_mode_freezes_statistics():
    g = bin_centres(M30, [3] * M30)
    t = torch.zeros_like(g)
    ghm = GHMC()
    ghm.harmonize(logits_for_g(g, t), t)
    acc = ghm.acc_count.clone()
    ghm.eval()
    t50 = torch.zeros(50, dtype=torch.float64)
    ghm.harmonize(logits_for_g(torch.full((50,), 0.5, dtype=torch.float64), t50), t50)
    assert torch.equal(ghm.acc_count, acc)


# ------------------------------------------------------------------------------------------------
# Per-level (mmdetection) vs whole batch
# ------------------------------------------------------------------------------------------------
def test_per_level_vs_whole_batch_differ_as_predicted():
    """Two levels along dim 1 sharing bin 0 (and each with its own second bin)."""
    m = 0.75
    c = {"A0": 30, "A5": 6, "B0": 10, "B25": 4}
    gA = bin_centres(M30, [c["A0"]] + [0] * 4 + [c["A5"]])
    gB = bin_centres(M30, [c["B0"]] + [0] * 24 + [c["B25"]])
    tA, tB = torch.zeros_like(gA), torch.zeros_like(gB)
    x = torch.cat([logits_for_g(gA, tA), logits_for_g(gB, tB)])[None]  # (1, R, ) levels on dim 1
    t = torch.zeros_like(x)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")[0]
    nA = gA.numel()
    bceA, bceB = bce[:nA], bce[nA:]
    is0A, is0B = gA < 1 / M30, gB < 1 / M30

    whole = GHMC(momentum=m, mmdet_compat=True)
    per_level = GHMC(momentum=m, mmdet_compat=True, per_level=True)
    lw = whole.harmonize(x, t, level_sizes=[nA, gB.numel()])
    lp = per_level.harmonize(x, t, level_sizes=[nA, gB.numel()])

    # Whole batch: one update with the summed counts; 3 non-empty bins; N = 50.
    acc_w = {0: (1 - m) * 40, 5: (1 - m) * 6, 25: (1 - m) * 4}
    for b, v in acc_w.items():
        assert whole.acc_count[b].item() == pytest.approx(v)
    n = 50
    fw = lambda b: n / (3 * acc_w[b]) / n  # noqa: E731  beta / N
    exp_w = (
        fw(0) * (bceA[is0A].sum() + bceB[is0B].sum())
        + fw(5) * bceA[~is0A].sum()
        + fw(25) * bceB[~is0B].sum()
    )
    assert lw.item() == pytest.approx(exp_w.item(), rel=1e-9)

    # Per level: level A updates bin 0 first, then level B updates it again (two EMA steps per
    # iteration); every level has 2 non-empty bins and its own N; the level losses are summed.
    a0_after_A = (1 - m) * 30
    a0_after_B = m * a0_after_A + (1 - m) * 10
    assert per_level.acc_count[0].item() == pytest.approx(a0_after_B)
    assert per_level.num_updates[0].item() == 2
    exp_A = (bceA[is0A].sum() / (2 * a0_after_A) + bceA[~is0A].sum() / (2 * (1 - m) * 6))
    exp_B = (bceB[is0B].sum() / (2 * a0_after_B) + bceB[~is0B].sum() / (2 * (1 - m) * 4))
    assert lp.item() == pytest.approx((exp_A + exp_B).item(), rel=1e-9)
    assert abs(lp.item() - lw.item()) > 0.1 * lw.item()


def test_level_with_no_anchors():
    x = torch.randn(2, 40, 3)
    t = (torch.rand(2, 40, 3) < 0.1).float()
    a = GHMC(per_level=True)
    b = GHMC(per_level=True)
    la = a.harmonize(x, t, level_sizes=[0, 40, 0])
    lb = b.harmonize(x, t, level_sizes=[40])
    assert torch.isfinite(la) and la.item() == pytest.approx(lb.item())
    assert torch.equal(a.acc_count, b.acc_count)
    r = GHMR(per_level=True)
    mask = torch.rand(2, 40, 1) < 0.3
    lr = r.harmonize(torch.randn(2, 40, 4), torch.randn(2, 40, 4), mask, level_sizes=[0, 40])
    assert torch.isfinite(lr)


# ------------------------------------------------------------------------------------------------
# Gradients, label weights, degenerate data
# ------------------------------------------------------------------------------------------------
def _away_from_edges(g, bins, margin=1e-3):
    frac = (g * bins) - torch.floor(g * bins)
    return bool(((frac > margin) & (frac < 1 - margin)).all())


@pytest.mark.parametrize("bias_correction", [False, True])
def test_gradcheck_ghmc(bias_correction):
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64)
    t = (torch.rand(6, 5) < 0.3).to(torch.float64)
    lw = torch.rand(6, 5, dtype=torch.float64) + 0.1
    assert _away_from_edges(GHMC.gradient_norm(x, t), M30)
    ghm = GHMC(bias_correction=bias_correction)
    ghm.harmonize(x, t, lw)  # one training step fills the statistics
    ghm.eval()  # frozen statistics: the weights are constants of the input
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ghm.harmonize(z, t, lw), (x,), eps=1e-6, atol=1e-8)
    # Closed form: d loss / d x_i = w_i beta_b(i) (sigmoid(x_i) - t_i) / N.
    loss = ghm.harmonize(x, t, lw)
    (grad,) = torch.autograd.grad(loss, x)
    idx = (GHMC.gradient_norm(x.detach(), t) * M30).long()
    n = lw.sum()
    smoothed = ghm.acc_count
    if bias_correction:
        smoothed = smoothed / (1 - 0.75 ** ghm.num_updates.double())
    beta = n / (M30 * smoothed)
    assert torch.allclose(grad, lw * beta[idx] * (torch.sigmoid(x.detach()) - t) / n)


def test_gradcheck_ghmr():
    torch.manual_seed(2)
    pred = torch.randn(5, 4, dtype=torch.float64) * 0.05
    target = torch.zeros_like(pred)
    r = GHMR()
    assert _away_from_edges(r.gradient_norm(pred - target), 10)
    mask = torch.rand(5, 1) < 0.8
    r.harmonize(pred, target, mask)
    r.eval()
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: r.harmonize(z, target, mask), (pred,), eps=1e-7, atol=1e-7)


def test_integer_label_weights_equal_duplicated_samples():
    torch.manual_seed(3)
    x = torch.randn(20, 4, dtype=torch.float64)
    t = (torch.rand(20, 4) < 0.3).to(torch.float64)
    w = torch.randint(0, 3, (20, 1)).to(torch.float64)  # 0 = ignored, 2 = counts twice
    reps = w[:, 0].long()
    weighted = GHMC().harmonize(x, t, w)
    duplicated = GHMC().harmonize(x.repeat_interleave(reps, 0), t.repeat_interleave(reps, 0))
    assert weighted.item() == pytest.approx(duplicated.item(), rel=1e-9)
    # mmdetection-compatible mode: weights only as a 0/1 mask.
    masked = GHMC(mmdet_compat=True).harmonize(x, t, w)
    subset = GHMC(mmdet_compat=True).harmonize(x[reps > 0], t[reps > 0])
    assert masked.item() == pytest.approx(subset.item(), rel=1e-9)
    assert abs(masked.item() - weighted.item()) > 1e-6
    # GHM-R too.
    p = torch.randn(20, 4, dtype=torch.float64) * 0.1
    wr = GHMR().harmonize(p, torch.zeros_like(p), w)
    dr = GHMR().harmonize(p.repeat_interleave(reps, 0), torch.zeros(int(reps.sum()), 4, dtype=torch.float64))
    assert wr.item() == pytest.approx(dr.item(), rel=1e-9)


def test_no_positives_and_no_samples():
    r = GHMR()
    pred = torch.randn(2, 30, 4, requires_grad=True)
    loss = r.harmonize(pred, torch.randn(2, 30, 4), torch.zeros(2, 30, 1, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))
    assert int(r.num_updates.sum()) == 0 and float(r.acc_count.sum()) == 0.0
    # Only negatives for GHM-C: finite, positive loss.
    c = GHMC()
    x = torch.randn(2, 30, 5, requires_grad=True)
    lc = c.harmonize(x, torch.zeros(2, 30, 5))
    lc.backward()
    assert torch.isfinite(lc) and lc.item() > 0 and torch.isfinite(x.grad).all()
    # Empty input.
    assert GHMC().harmonize(torch.zeros(0, 5), torch.zeros(0, 5)).item() == 0.0


def test_nonfinite_predictions_skip_or_error():
    torch.manual_seed(4)
    x = torch.randn(10, 3)
    t = (torch.rand(10, 3) < 0.3).float()
    bad = x.clone()
    bad[2, 1] = float("nan")
    bad[7, 0] = float("inf")
    keep = torch.isfinite(bad)
    ghm = GHMC()
    xb = bad.clone().requires_grad_(True)
    loss = ghm.harmonize(xb, t)
    loss.backward()
    ref = GHMC().harmonize(x, t, keep)  # same as ignoring those two samples
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item())
    assert torch.isfinite(xb.grad).all() and xb.grad[2, 1] == 0 and xb.grad[7, 0] == 0
    assert int(ghm.num_nonfinite) == 2 and torch.isfinite(ghm.acc_count).all()
    assert float(ghm.acc_count.sum()) == pytest.approx(0.25 * 28)
    with pytest.raises(FloatingPointError, match="non-finite"):
        GHMC(nonfinite="error").harmonize(bad, t)
    r = GHMR(nonfinite="error")
    with pytest.raises(FloatingPointError, match="GHM-R"):
        r.harmonize(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]), torch.zeros(1, 4))
    # skipping some is a feature; skipping every valid prediction gives NaN (the trainer stops)
    everything = torch.full_like(bad, float("nan"))
    assert torch.isnan(GHMC().harmonize(everything, t))
    assert torch.isnan(GHMR().harmonize(torch.full((3, 4), float("inf")), torch.zeros(3, 4)))
    ignored_bad = bad.clone()
    ignored_bad[2] = float("nan")
    assert torch.isfinite(GHMC().harmonize(ignored_bad, t, keep.all(1, keepdim=True)))  # only ignored ones
    assert GHMC().harmonize(everything, t, torch.zeros(10, 1, dtype=torch.bool)).item() == 0.0


# ------------------------------------------------------------------------------------------------
# The heads' interfaces: GHMC.forward (classification), GHMR.forward / per_box (box regression)
# ------------------------------------------------------------------------------------------------
def test_registered_as_head_losses():
    assert CLASSIFICATION_LOSS_REGISTRY.get("ghm_c") is GHMC
    assert BOX_REG_LOSS_REGISTRY.get("ghm_r") is GHMR
    assert GHMC.normalized and GHMR.normalized  # the heads do not divide them again
    assert issubclass(GHMC, GradientHarmonizer) and issubclass(GHMR, GradientHarmonizer)


def test_ghmc_forward_is_harmonize_over_valid_anchors():
    """forward(logits (N,R,K), targets, valid (N,R), level_sizes) == harmonize with the valid mask
    broadcast over the classes, per level in per-level mode too."""
    torch.manual_seed(7)
    x = torch.randn(2, 50, 3, dtype=torch.float64) * 2
    t = (torch.rand(2, 50, 3) < 0.2).to(torch.float64)
    valid = torch.rand(2, 50) < 0.8
    for per_level in (False, True):
        a, b = GHMC(per_level=per_level), GHMC(per_level=per_level)
        for _ in range(2):
            la = a(x, t, valid, [30, 20])
            lb = b.harmonize(x, t, valid.unsqueeze(-1), [30, 20])
            assert torch.equal(la, lb)
            assert torch.equal(a.acc_count, b.acc_count)
    # ignored anchors are left out: same as dropping them
    ref = GHMC().harmonize(x[valid], t[valid])
    assert GHMC()(x, t, valid).item() == pytest.approx(ref.item(), rel=1e-12)


def _box_pairs(n, seed):
    """Proposals, matched ground truths (valid boxes) and predicted deltas near the targets."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    props = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 40 + 8], 1)
    gt = props + torch.randn(n, 4, generator=g) * 3
    gt = torch.cat([gt[:, :2], torch.maximum(gt[:, 2:], gt[:, :2] + 2)], 1)
    b2b = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    target = b2b.get_deltas(props, gt)
    pred = target + torch.randn(n, 4, generator=g) * 0.05  # g spread over the 10 bins
    return props, gt, pred, b2b


def test_ghmr_forward_is_harmonize_over_foreground_deltas():
    """GHMR.forward (Detectron2's dense format) encodes the targets itself and masks the
    background: == harmonize(pred, encoded targets, fg mask), normalised by 4 x foreground."""
    props, gt, pred, b2b = _box_pairs(80, seed=1)
    fg = torch.rand(1, 80, generator=torch.Generator().manual_seed(2)) < 0.5
    anchors = [Boxes(props[:50]), Boxes(props[50:])]
    preds = [pred[None, :50], pred[None, 50:]]
    a, b = GHMR(), GHMR()
    la = a(anchors, b2b, preds, [gt], fg)
    target = encode_box_deltas(props, gt[None], b2b.weights)
    lb = b.harmonize(pred[None], target, fg.unsqueeze(-1))
    assert la.item() == pytest.approx(lb.item(), rel=1e-5)
    assert torch.equal(a.acc_count, b.acc_count)
    assert float(a.acc_count.sum()) == pytest.approx((1 - 0.7) * 4 * int(fg.sum()))
    # Background boxes may have meaningless (even infinite) targets: they are masked out.
    bad_gt = gt.clone()
    bad_gt[~fg[0]] = props[~fg[0]] * torch.tensor([1.0, 1.0, 0.0, 0.0])  # zero-size: log(0) = -inf
    p = [x.clone().requires_grad_(True) for x in preds]
    lc = GHMR()(anchors, b2b, p, [bad_gt], fg)
    lc.backward()
    assert torch.isfinite(lc) and all(torch.isfinite(x.grad).all() for x in p)
    assert (torch.cat([x.grad for x in p], 1)[~fg] == 0).all()


def test_encode_box_deltas_matches_box2box_transform():
    torch.manual_seed(6)
    xy = torch.rand(50, 2) * 100
    anchors = torch.cat([xy, xy + torch.rand(50, 2) * 50 + 1], 1)
    gxy = torch.rand(2, 50, 2) * 100
    gt = torch.cat([gxy, gxy + torch.rand(2, 50, 2) * 50 + 1], -1)
    weights = (10.0, 10.0, 5.0, 5.0)
    ours = encode_box_deltas(anchors, gt, weights)
    ref = torch.stack([Box2BoxTransform(weights).get_deltas(anchors, g) for g in gt])
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)


def _ghmr_state(r):
    return (r.acc_count.clone(), r.num_updates.clone(), r.num_nonfinite.clone(), r.last_bin_weights)


def test_ghmr_per_box_is_read_only_and_sums_to_forward():
    """per_box (what OHEM ranks RoIs by) leaves acc_count / num_updates untouched, in training
    mode too, and its per-box values sum to what forward returns on the same boxes with the same
    statistics (forward in eval mode, which does not update them either)."""
    r = GHMR()
    for step in range(3):  # some history, so that the moving average differs from any batch
        props, gt, pred, b2b = _box_pairs(60, seed=10 + step)
        r([props], b2b, [pred[None]], [gt], torch.ones(1, 60, dtype=torch.bool))
    assert int(r.num_updates.sum()) > 3
    props, gt, pred, b2b = _box_pairs(90, seed=20)
    fg = torch.rand(90, generator=torch.Generator().manual_seed(3)) < 0.6
    before = _ghmr_state(r)
    r.train()
    per_box = r.per_box(props[fg], gt[fg], pred[fg], b2b)
    after = _ghmr_state(r)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert torch.equal(before[2], after[2]) and after[3] is before[3]
    assert per_box.shape == (int(fg.sum()),) and (per_box >= 0).all() and per_box.sum() > 0
    r.eval()
    total = r([props], b2b, [pred[None]], [gt], fg[None])
    assert per_box.sum().item() == pytest.approx(total.item(), rel=1e-5)
    assert torch.equal(r.acc_count, before[0]) and torch.equal(r.num_updates, before[1])
    # The per-box values are the weighted ASL1 of each box: same bins, same factors.
    d = pred[fg] - b2b.get_deltas(props[fg], gt[fg])
    asl1 = torch.sqrt(d * d + 0.02 ** 2) - 0.02
    idx = (r.gradient_norm(d) * 10).long().clamp(max=9)
    factor = r.last_bin_weights[idx] / d.numel()  # beta / N
    assert torch.allclose(per_box, (asl1 * factor).sum(1).float() * 10.0, rtol=1e-5)
    # A training-mode forward does update the statistics (the control).
    r.train()
    r([props], b2b, [pred[None]], [gt], fg[None])
    assert not torch.equal(r.acc_count, before[0])


def test_per_roi_losses_with_ghmr_are_read_only():
    """The box predictor's per_roi_losses (OHEM's ranking) with ghm_r: the foreground RoIs get
    GHMR.per_box times the loss weight, the others 0, and the statistics do not move."""
    r = GHMR()
    props, gt, pred, b2b = _box_pairs(40, seed=30)
    r([props], b2b, [pred[None]], [gt], torch.ones(1, 40, dtype=torch.bool))
    head = LibraGHMFastRCNNOutputLayers(
        ShapeSpec(channels=8), box2box_transform=b2b, num_classes=3, box_reg_loss=r,
        loss_weight={"loss_box_reg": 2.0},
    )
    head.train()
    classes = torch.tensor([0, 1, 2, 3] * 10)  # 3 = background
    inst = Instances((128, 128))
    inst.proposal_boxes, inst.gt_boxes, inst.gt_classes = Boxes(props), Boxes(gt), classes
    deltas = pred.repeat(1, 3)  # class-specific deltas, the same for every class
    before = _ghmr_state(r)
    out = head.per_roi_losses((torch.randn(40, 4), deltas), [inst])
    after = _ghmr_state(r)
    assert all(torch.equal(a, b) for a, b in zip(before[:3], after[:3])) and after[3] is before[3]
    fg = classes < 3
    want = 2.0 * r.per_box(props[fg], gt[fg], pred[fg], b2b)
    assert torch.allclose(out["loss_box_reg"][fg], want) and (out["loss_box_reg"][~fg] == 0).all()


# ------------------------------------------------------------------------------------------------
# Mixed precision and large counts
# ------------------------------------------------------------------------------------------------
def test_bf16_autocast_and_half_inputs_close_to_fp32():
    torch.manual_seed(5)
    feats = torch.randn(64, 16)
    layer = torch.nn.Linear(16, 8)
    t = (torch.rand(64, 8) < 0.2).float()
    ref = GHMC().harmonize(layer(feats), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(feats)
        assert logits.dtype == torch.bfloat16
        loss = GHMC().harmonize(logits, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), rel=0.05)
    xh = layer(feats).detach().half().requires_grad_(True)
    lh = GHMC().harmonize(xh, t.half())
    lh.backward()
    assert lh.dtype == torch.float32 and torch.isfinite(xh.grad).all()
    assert lh.item() == pytest.approx(ref.item(), rel=0.02)
    p = torch.randn(32, 4) * 0.1
    assert GHMR().harmonize(p.half(), torch.zeros(32, 4).half()).item() == pytest.approx(
        GHMR().harmonize(p.half().float(), torch.zeros(32, 4)).item(), rel=1e-4
    )


def test_large_counts_no_overflow_in_half():
    n_big = 3_000_000
    g = torch.full((n_big + 1,), 0.001)
    g[-1] = 0.999  # one sample alone in the last bin, 3e6 in bin 0
    t = torch.zeros_like(g)
    x = torch.logit(g).half().requires_grad_(True)
    ghm = GHMC(momentum=0.0)
    loss = ghm.harmonize(x, t.half())
    loss.backward()
    beta = ghm.last_bin_weights
    assert beta[-1].item() == pytest.approx((n_big + 1) / M30)  # ~1e5: would be inf in fp16
    assert beta[0].item() == pytest.approx((n_big + 1) / (M30 * n_big))
    assert torch.isfinite(loss) and torch.isfinite(x.grad.float()).all()
    # The lone sample's gradient: beta / N * (p - t) = (1/M) * 0.999
    assert x.grad[-1].item() == pytest.approx(0.999 / M30, rel=1e-2)


def test_statistics_stay_float64_under_half():
    ghm = GHMC()
    ghm.harmonize(torch.randn(10, 3), torch.zeros(10, 3))
    before = ghm.acc_count.clone()
    ghm.half()
    assert ghm.acc_count.dtype == torch.float64 and torch.equal(ghm.acc_count, before)


# ------------------------------------------------------------------------------------------------
# No host synchronisation in the loss (Python-level sync calls are forbidden during the call)
# ------------------------------------------------------------------------------------------------
_SYNC_METHODS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"]


@pytest.fixture
def forbid_sync(monkeypatch):
    def install():
        for name in _SYNC_METHODS:
            def boom(*args, _name=name, **kwargs):
                raise AssertionError(f"host sync via Tensor.{_name}")
            monkeypatch.setattr(torch.Tensor, name, boom)
    return install


def _dense_outputs(model, batch):
    """Per-level logits (leaf tensors), deltas, anchors and Detectron2's anchor labels."""
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    pred_logits, pred_deltas = model._transpose_dense_predictions(
        model.head(features), [model.num_classes, 4]
    )
    anchors = model.anchor_generator(features)
    gt_labels, gt_boxes = model.label_anchors(anchors, [b["instances"] for b in batch])
    return pred_logits, pred_deltas, anchors, gt_labels, gt_boxes


def test_losses_make_no_host_sync(forbid_sync):
    """LibraGHMRetinaNet.losses with ghm_c + ghm_r (both self-normalised: no moving average of the
    positives either) makes no host synchronisation."""
    model = build_model(get_config("Shapes-Detection/ghm_retinanet.yaml"))
    pred_logits, pred_deltas, anchors, gt_labels, gt_boxes = _dense_outputs(model, tiny_batch(2))
    forbid_sync()
    losses = model.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)
    sum(losses.values()).backward()


# ------------------------------------------------------------------------------------------------
# Models: LibraGHMRetinaNet (ghm_c / ghm_r) and LibraGHMRPN (ghm_c objectness)
# ------------------------------------------------------------------------------------------------
def _step(model, batch, opt):
    losses = model(batch)
    total = sum(losses.values())
    opt.zero_grad()
    total.backward()
    opt.step()
    return {k: float(v) for k, v in losses.items()}


def test_ghm_retinanet_config_builds_ghm_losses():
    model = build_model(get_config("Shapes-Detection/ghm_retinanet.yaml"))
    assert isinstance(model, LibraGHMRetinaNet)
    assert type(model.cls_loss) is GHMC and type(model.box_reg_loss) is GHMR
    c, r = model.cls_loss, model.box_reg_loss
    # the Shapes config pins BIAS_CORRECTION True, as its released model was trained
    assert (c.bins, c.momentum, c.loss_weight, c.bias_correction) == (30, 0.75, 1.0, True)
    assert (r.mu, r.bins, r.momentum, r.loss_weight, r.bias_correction) == (0.02, 10, 0.7, 10.0, True)
    coco = build_model(get_config("COCO-Detection/ghm_retinanet_R_50_FPN_1x.yaml"))
    assert coco.cls_loss.bias_correction is False and coco.box_reg_loss.bias_correction is False


def test_tiny_ghm_retinanet_trains():
    torch.manual_seed(0)
    cfg = get_config("Shapes-Detection/ghm_retinanet.yaml")
    model = build_model(cfg)
    model.train()
    batch = tiny_batch(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with EventStorage(0):
        hist = [_step(model, batch, opt) for _ in range(5)]
        for h in hist:
            assert all(math.isfinite(v) for v in h.values())
        assert hist[-1]["loss_cls"] < hist[0]["loss_cls"]
        assert int(model.cls_loss.num_updates.sum()) > 0
        assert int(model.box_reg_loss.num_updates.sum()) > 0
        # GHM-R's loss value is not a fixed objective (its weights follow the gradient-norm
        # histogram, and at a usual LR the lone samples of sparse bins make it stiff), so check that
        # the objective with frozen statistics decreases under small steps.
        model.cls_loss.eval()
        model.box_reg_loss.eval()
        small = torch.optim.SGD(model.parameters(), lr=5e-4)
        frozen = [_step(model, batch, small)["loss_box_reg"] for _ in range(4)]
        assert frozen[-1] < frozen[0]


# ------------------------------------------------------------------------------------------------
# Targets, weights and learning signal of GHM-C inside LibraGHMRetinaNet (regression tests for the
# "all scores ~0.5" investigation: they pin down that its GHM-C is the paper's loss on Detectron2's
# own anchor targets, and that the 0.5 clustering is GHM-C's own equilibrium)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_correction", [False, True])
def test_ghm_c_equals_paper_formula_on_detectron2_focal_targets(bias_correction):
    """
    LibraGHMRetinaNet's loss_cls, and its gradient on every logit, equal the paper's GHM-C written
    out by hand (one loop over the bins, beta = N / (M * S) with S the moving-average count) on the
    samples and one-hot targets that Detectron2's RetinaNet.losses builds for its focal loss
    (``cat(pred_logits, 1)[valid]``, ``one_hot(gt_labels[valid], K + 1)[:, :-1]``). Catches
    misaligned targets, wrong targets for negatives, ignored anchors counted, weights on the wrong
    samples and a wrong normaliser. First step: S = (1 - m) x count from zero (the default, as the
    paper), or the count itself with the bias correction.
    """
    cfg = get_config("Shapes-Detection/ghm_retinanet.yaml",
                     "MODEL.GHM_C.BIAS_CORRECTION", bias_correction)
    model = build_model(cfg)
    model.train()
    with torch.no_grad():  # spread the logits over many bins (at init they fill only two)
        model.head.cls_score.weight.normal_(0.0, 0.3)
        model.head.cls_score.bias.zero_()
    pred_logits, pred_deltas, anchors, gt_labels, gt_boxes = _dense_outputs(model, tiny_batch(2))
    pred_logits = [p.detach().requires_grad_(True) for p in pred_logits]
    ours = model.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)["loss_cls"]
    grad_ours = torch.cat(torch.autograd.grad(ours, pred_logits), dim=1)

    labels = torch.stack(gt_labels)
    K = model.num_classes
    valid = labels >= 0
    x = cat(pred_logits, dim=1)[valid]
    t = F.one_hot(labels[valid], num_classes=K + 1)[:, :-1].to(x.dtype)
    g = (torch.sigmoid(x.detach()) - t).abs()
    n = x.numel()
    first_step = 1.0 if bias_correction else 1.0 - 0.75
    weight = torch.zeros_like(x)
    filled = 0
    for b in range(M30):
        in_bin = (g >= b / M30) & ((g < (b + 1) / M30) if b < M30 - 1 else (g <= 1))
        count = int(in_bin.sum())
        if count:
            weight[in_bin] = n / (M30 * first_step * count)
            filled += 1
    ref = (F.binary_cross_entropy_with_logits(x, t, reduction="none") * weight).sum() / n
    grad_ref = torch.cat(torch.autograd.grad(ref, pred_logits), dim=1)

    assert filled >= 10 and int((labels == -1).sum()) > 0 and int((valid & (labels < K)).sum()) > 0
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(grad_ours, grad_ref, rtol=1e-4, atol=1e-9 * float(grad_ref.abs().max()))
    # Signs: the ground-truth class of a positive is pulled up, every logit of a negative down,
    # ignored anchors get nothing.
    pos = valid & (labels < K)
    assert (grad_ours[pos].gather(1, labels[pos][:, None]) < 0).all()
    assert (grad_ours[labels == K] > 0).all()
    assert (grad_ours[labels == -1] == 0).all()


def test_ghm_retinanet_separates_positives_on_a_fixed_batch():
    """30 SGD steps on one batch: positives' ground-truth class scores rise above negatives'.
    With the bias correction: the paper's average from zero gives 1/(1-m) = 4x larger GHM-C
    weights in the first steps, which at this learning rate overshoots and ranks more slowly
    (AUC ~0.75 after 30 steps)."""
    torch.manual_seed(0)
    model = build_model(get_config(
        "Shapes-Detection/ghm_retinanet.yaml",
        "MODEL.GHM_C.BIAS_CORRECTION", True, "MODEL.GHM_R.BIAS_CORRECTION", True,
    ))
    model.train()
    batch = tiny_batch(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with EventStorage(0):
        for _ in range(30):
            _step(model, batch, opt)
    with torch.no_grad():
        pred_logits, _, _, gt_labels, _ = _dense_outputs(model, batch)
    p = torch.sigmoid(cat(pred_logits, dim=1))
    labels = torch.stack(gt_labels)
    pos = (labels >= 0) & (labels < model.num_classes)
    p_pos = p[pos].gather(1, labels[pos][:, None]).reshape(-1, 1)
    p_neg = p[labels == model.num_classes].reshape(1, -1)
    auc = (p_pos > p_neg).float().mean().item()  # P(positive ranked above a negative logit)
    assert auc > 0.85, auc
    assert p_pos.mean() > 3 * p_neg.mean()


@pytest.mark.parametrize("num_neg", [10, 1000])
def test_ghmc_shared_bias_equilibrium_is_one_half(num_neg):
    """
    GHM-C's own behaviour, not a bug: every non-empty bin gets the same total weight N / M, so for
    a logit shared by 1 positive and R negatives (p on all of them; the two sit in different bins
    unless p = 0.5) the gradient on the shared logit is (p + (p - 1)) / M = (2p - 1) / M, whatever
    R is. The class prior is gone: anything the features cannot yet tell apart is driven to
    p = 0.5, where BCE (gradient (R p + p - 1) / (R + 1)) would drive it to 1 / (R + 1).
    """
    for p in (0.05, 0.3, 0.45, 0.55, 0.8):
        b = torch.tensor(math.log(p / (1 - p)), dtype=torch.float64, requires_grad=True)
        t = torch.zeros(num_neg + 1, dtype=torch.float64)
        t[0] = 1.0
        loss = GHMC(momentum=0.0).harmonize(b.expand(num_neg + 1), t)
        (grad,) = torch.autograd.grad(loss, b)
        assert grad.item() == pytest.approx((2 * p - 1) / M30, rel=1e-9)
        bce = F.binary_cross_entropy_with_logits(b.expand(num_neg + 1), t)
        (grad_bce,) = torch.autograd.grad(bce, b)
        assert grad_bce.item() == pytest.approx((num_neg * p + p - 1) / (num_neg + 1), rel=1e-9)


def test_ghm_retinanet_image_without_gt():
    cfg = get_config("Shapes-Detection/ghm_retinanet.yaml")
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(tiny_batch(2, with_gt=(False, False)))
    assert losses["loss_box_reg"].item() == 0.0 and torch.isfinite(losses["loss_cls"])
    sum(losses.values()).backward()


@pytest.mark.parametrize("box_type", ["smooth_l1", "giou", "balanced_l1"])
def test_focal_and_detectron2_box_types_equal_stock_retinanet(box_type):
    """LibraGHMRetinaNet with CLS_LOSS_TYPE focal and a Detectron2 box type computes stock
    RetinaNet's losses; with balanced_l1 (which stock RetinaNet does not take) its loss_cls is
    still the stock one (the box value is checked in test_balanced_l1.py)."""
    stock_box = "smooth_l1" if box_type == "balanced_l1" else box_type
    stock = build_model(get_config(
        "Shapes-Detection/retinanet_small_R_FPN.yaml", "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", stock_box
    ))
    libra = build_model(get_config(
        "Shapes-Detection/ghm_retinanet.yaml", "MODEL.RETINANET.CLS_LOSS_TYPE", "focal",
        "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", box_type,
    ))
    assert type(libra.cls_loss) is SigmoidFocalLoss
    assert libra.box_reg_loss.name == box_type
    missing, unexpected = libra.load_state_dict(stock.state_dict(), strict=False)
    assert missing == ["loss_normalizer"] and not unexpected
    stock.train()
    libra.train()
    batch = tiny_batch(2)
    with EventStorage(0):
        ls = stock(batch)
        lg = libra(batch)
    keys = ("loss_cls",) if box_type == "balanced_l1" else ("loss_cls", "loss_box_reg")
    for k in keys:
        assert lg[k].item() == pytest.approx(ls[k].item(), rel=1e-5), k
    # Detectron2's Python-float normaliser and LibraGHM's float64 buffer moved alike.
    assert libra.loss_normalizer.item() == pytest.approx(stock.loss_normalizer, rel=1e-12)


@pytest.mark.parametrize(
    "cls_type,box_type,cls_cls,box_cls",
    [
        ("ghm_c", "smooth_l1", GHMC, SmoothL1Loss),
        ("focal", "ghm_r", SigmoidFocalLoss, GHMR),
        ("ghm_c", "balanced_l1", GHMC, BalancedL1Loss),
        ("bce", "ghm_r", BinaryCrossEntropyLoss, GHMR),
    ],
)
def test_mixed_loss_types_build_and_run(cls_type, box_type, cls_cls, box_cls):
    cfg = get_config(
        "Shapes-Detection/ghm_retinanet.yaml",
        "MODEL.RETINANET.CLS_LOSS_TYPE", cls_type, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", box_type,
    )
    model = build_model(cfg)
    model.train()
    assert type(model.cls_loss) is cls_cls and type(model.box_reg_loss) is box_cls
    with EventStorage(0):
        losses = model(tiny_batch(2))
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box_reg"] > 0
    # A loss that is not self-normalised is divided by the moving average of the positives,
    # which then has moved away from its initial 100.
    moved = not (model.cls_loss.normalized and model.box_reg_loss.normalized)
    assert (model.loss_normalizer.item() != 100.0) == moved


def _spec(key):
    node, leaf = key.rsplit(".", 1)
    return (GHMR.PARAMS if node.endswith("GHM_R") else HARMONIZER_PARAMS)[leaf.lower()]


@pytest.mark.parametrize(
    "key,value",
    [
        ("MODEL.GHM_C.BINS", 0),
        ("MODEL.GHM_C.BINS", 2.5),
        ("MODEL.GHM_C.MOMENTUM", 1.0),
        ("MODEL.GHM_C.MOMENTUM", -0.1),
        ("MODEL.GHM_C.LOSS_WEIGHT", -1.0),
        ("MODEL.GHM_C.BIAS_CORRECTION", 1),
        ("MODEL.GHM_C.NONFINITE", "ignore"),
        ("MODEL.GHM_R.BINS", 0),
        ("MODEL.GHM_R.MOMENTUM", 1.5),
        ("MODEL.GHM_R.MU", 0.0),
        ("MODEL.GHM_R.PER_LEVEL", "yes"),
    ],
)
def test_bad_config_fails_at_build_time(key, value):
    """The message names the key, the value and the valid range (from the PARAMS tables)."""
    cfg = get_config("Shapes-Detection/ghm_retinanet.yaml")
    node, leaf = key.rsplit(".", 1)
    # set directly: yacs' merge would already refuse a value of another type than the default's
    setattr(cfg_node(cfg, node), leaf, value)
    with pytest.raises(ValueError) as info:
        build_model(cfg)
    assert str(info.value) == f"{key} = {value!r} is invalid: expected {_spec(key).describe()}."


@pytest.mark.parametrize(
    "key,value,registry,listed",
    [
        ("MODEL.RETINANET.CLS_LOSS_TYPE", "ghmc", CLASSIFICATION_LOSS_REGISTRY, "'ghm_c'"),
        ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghmr", BOX_REG_LOSS_REGISTRY, "'ghm_r'"),
        ("MODEL.RPN.OBJECTNESS_LOSS_TYPE", "ghmc", CLASSIFICATION_LOSS_REGISTRY, "'ghm_c'"),
    ],
)
def test_unknown_loss_type_fails_at_build_time(key, value, registry, listed):
    if "RPN" in key:
        cfg = get_config("Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
                         "MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", key, value)
    else:
        cfg = get_config("Shapes-Detection/ghm_retinanet.yaml", key, value)
    with pytest.raises(ValueError) as info:
        build_model(cfg)
    msg = str(info.value)
    assert msg.startswith(f"{key} = {value!r} is invalid: expected one of {registry.names()}")
    assert listed in msg


@pytest.mark.parametrize(
    "old,new",
    [
        ("LIBRAGHM.GHMC.BINS", "MODEL.GHM_C.BINS"),
        ("LIBRAGHM.GHMR.MU", "MODEL.GHM_R.MU"),
        ("LIBRAGHM.GHM_RETINANET.BOX_LOSS_TYPE", "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"),
        ("LIBRAGHM.GHM_RPN.SUBSAMPLE", "MODEL.RPN.SAMPLER"),
    ],
)
def test_old_keys_name_the_new_ones(old, new):
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}".replace(".", r"\.")):
        get_config("Shapes-Detection/ghm_retinanet.yaml", old, 1)


@pytest.mark.parametrize(
    "key,old,new",
    [
        ("MODEL.META_ARCHITECTURE", "GHMRetinaNet", "LibraGHMRetinaNet"),
        ("MODEL.PROPOSAL_GENERATOR.NAME", "GHMRPN", "LibraGHMRPN"),
    ],
)
def test_old_class_names_name_the_replacement(key, old, new):
    rel = "ghm_retinanet.yaml" if "META" in key else "faster_rcnn_small_R_FPN.yaml"
    cfg = get_config(f"Shapes-Detection/{rel}", key, old)
    with pytest.raises(ValueError, match=f"'{old}' was replaced .*{new}"):
        build_model(cfg)


def test_bad_config_fails_for_ghm_rpn():
    cfg = get_config(
        "Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
        "MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.OBJECTNESS_LOSS_TYPE", "ghm_c",
        "MODEL.GHM_C.BINS", -3,
    )
    with pytest.raises(ValueError, match=r"MODEL\.GHM_C\.BINS = -3 is invalid: expected an integer"):
        build_model(cfg)


def test_checkpoint_round_trip_restores_statistics(tmp_path):
    cfg = get_config("Shapes-Detection/ghm_retinanet.yaml")
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        sum(model(tiny_batch(2)).values()).backward()
    assert float(model.cls_loss.acc_count.sum()) > 0 and float(model.box_reg_loss.acc_count.sum()) > 0
    keys = set(model.state_dict())
    for name in ("cls_loss", "box_reg_loss"):
        assert {f"{name}.acc_count", f"{name}.num_updates"} <= keys
        assert f"{name}.num_nonfinite" not in keys  # a diagnostic, not saved
    assert "loss_normalizer" in keys
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ghm")
    fresh = build_model(cfg)
    assert float(fresh.cls_loss.acc_count.sum()) == 0
    DetectionCheckpointer(fresh).load(os.path.join(str(tmp_path), "ghm.pth"))
    for name in ("cls_loss", "box_reg_loss"):
        a, b = getattr(model, name), getattr(fresh, name)
        assert torch.equal(a.acc_count, b.acc_count) and b.acc_count.dtype == torch.float64
        assert torch.equal(a.num_updates, b.num_updates)
    assert fresh.loss_normalizer.dtype == torch.float64


@pytest.mark.parametrize("sampler", ["NoSampling", "RandomSampler"])
def test_ghm_rpn_faster_rcnn_step(sampler):
    """GHM-C objectness in LibraGHMRPN: on all valid anchors (NoSampling, the GHM paper's use) or
    on Detectron2's BATCH_SIZE_PER_IMAGE sampled anchors."""
    cfg = get_config(
        "Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
        "MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.OBJECTNESS_LOSS_TYPE", "ghm_c",
        "MODEL.RPN.SAMPLER", sampler,
    )
    model = build_model(cfg)
    model.train()
    rpn = model.proposal_generator
    assert isinstance(rpn, LibraGHMRPN) and type(rpn.objectness_loss) is GHMC
    with EventStorage(0):
        losses = model(tiny_batch(2, with_gt=(True, False)))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_rpn_cls"].item() > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in rpn.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # first step: acc = (1 - m) counts (the default has no bias correction)
    n_samples = float(rpn.objectness_loss.acc_count.sum() / (1 - 0.75))
    per_image = cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE
    if sampler == "RandomSampler":
        assert n_samples <= 2 * per_image + 1e-6
    else:
        assert n_samples > 2 * per_image


def test_ghm_rpn_loss_is_ghmc_over_sampled_anchors():
    """loss_rpn_cls = MODEL.RPN.LOSS_WEIGHT x GHM-C over the valid anchors (self-normalised, not
    divided by BATCH_SIZE_PER_IMAGE x images)."""
    cfg = get_config(
        "Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
        "MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.OBJECTNESS_LOSS_TYPE", "ghm_c",
        "MODEL.RPN.SAMPLER", "NoSampling", "MODEL.RPN.LOSS_WEIGHT", 2.0,
    )
    rpn = build_model(cfg).proposal_generator
    gen = torch.Generator().manual_seed(8)
    sizes = [40, 10]
    N = 2
    xy = torch.rand(sum(sizes), 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + 20], 1)
    anchors = [Boxes(boxes[:40]), Boxes(boxes[40:])]
    logits = [torch.randn(N, n, generator=gen) * 2 for n in sizes]
    deltas = [torch.zeros(N, n, 4) for n in sizes]
    labels = [torch.randint(-1, 2, (50,), generator=gen) for _ in range(N)]
    gt = [boxes + 1.0 for _ in range(N)]
    with EventStorage(0):
        losses = rpn.losses(anchors, logits, labels, deltas, gt)
    lab = torch.stack(labels)
    valid = lab >= 0
    ref = GHMC().harmonize(cat(logits, 1)[valid], (lab[valid] == 1).float())
    assert losses["loss_rpn_cls"].item() == pytest.approx(2.0 * ref.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Distributed: two processes (gloo on CPU), forked so that they start without re-importing
# ------------------------------------------------------------------------------------------------
def _dist_data(step):
    """Deterministic per-rank data of different sizes; returns [(x, t, w), (x, t, w)]."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for rank, n in enumerate((37, 53)):
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64) * (1 + 2 * rank)
        t = (torch.rand(n, 4, generator=gen) < 0.2 + 0.3 * rank).to(torch.float64)
        w = (torch.rand(n, 1, generator=gen) < 0.9).to(torch.float64)
        out.append((x, t, w))
    return out


def _run_losses(slices, sync):
    """Three GHM-C and GHM-R steps on ``slices(step) -> (x, t, w)``; returns what to compare."""
    c, r = GHMC(sync_counts=sync), GHMR(sync_counts=sync)
    rec = {"c_beta": [], "r_beta": [], "c_loss": [], "r_loss": [], "c_grad": [], "r_grad": []}
    for step in range(3):
        x, t, w = slices(step)
        x = x.clone().requires_grad_(True)
        lc = c.harmonize(x, t, w)
        (gc,) = torch.autograd.grad(lc, x)
        p = (x.detach() * 0.05).requires_grad_(True)
        lr = r.harmonize(p, torch.zeros_like(p), w)
        (gr,) = torch.autograd.grad(lr, p)
        rec["c_beta"].append(c.last_bin_weights.clone())
        rec["r_beta"].append(r.last_bin_weights.clone())
        rec["c_loss"].append(lc.detach())
        rec["r_loss"].append(lr.detach())
        rec["c_grad"].append(gc)
        rec["r_grad"].append(gr)
    rec["c_acc"], rec["r_acc"] = c.acc_count.clone(), r.acc_count.clone()
    return rec


def _dist_worker(out_dir):
    from detectron2.utils import comm

    rank = comm.get_rank()
    assert comm.get_world_size() == 2
    for sync in (True, False):
        rec = _run_losses(lambda step: _dist_data(step)[rank], sync)
        torch.save(rec, os.path.join(out_dir, f"rank{rank}_{int(sync)}.pt"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forked_worker(rank, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _dist_worker(out_dir)
    finally:
        dist.destroy_process_group()


def test_distributed_counts_are_summed(tmp_path):
    ctx = torch.multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_forked_worker, args=(r, port, str(tmp_path))) for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join()
    assert [proc.exitcode for proc in procs] == [0, 0]
    r0, r1 = (torch.load(os.path.join(tmp_path, f"rank{r}_1.pt")) for r in (0, 1))

    def concatenated(step):
        (x0, t0, w0), (x1, t1, w1) = _dist_data(step)
        return torch.cat([x0, x1]), torch.cat([t0, t1]), torch.cat([w0, w1])

    single = _run_losses(concatenated, sync=True)  # world size 1 here
    n0 = _dist_data(0)[0][0].shape[0]
    for step in range(3):
        for k in ("c_beta", "r_beta"):
            assert torch.equal(r0[k][step], r1[k][step])  # identical on both processes
            assert torch.allclose(r0[k][step], single[k][step], rtol=1e-12)
        for k in ("c_loss", "r_loss"):
            # Each process normalises by N_global / 2: the mean over processes is the loss of one
            # process holding the whole batch, and DDP's averaged gradient is its gradient.
            mean = ((r0[k][step] + r1[k][step]) / 2).item()
            assert mean == pytest.approx(single[k][step].item(), rel=1e-10)
        for k in ("c_grad", "r_grad"):
            g = single[k][step]
            assert torch.allclose(r0[k][step] / 2, g[:n0], rtol=1e-10, atol=1e-15)
            assert torch.allclose(r1[k][step] / 2, g[n0:], rtol=1e-10, atol=1e-15)
    assert torch.equal(r0["c_acc"], r1["c_acc"]) and torch.allclose(r0["c_acc"], single["c_acc"])
    # Without SYNC_COUNTS every process keeps its own counts (mmdetection): the weights differ.
    u0, u1 = (torch.load(os.path.join(tmp_path, f"rank{r}_0.pt")) for r in (0, 1))
    assert not torch.allclose(u0["c_beta"][0], u1["c_beta"][0])
    assert not torch.allclose(u0["c_acc"], u1["c_acc"])


# Ops that read data back to the host on CUDA (inside the kernel launch or to size the output).
_SYNCING_OPS = {"bincount", "nonzero", "unique", "masked_select", "item", "tolist", "histc",
                "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "repeat_interleave"}


def _ops_called(fn):
    """Names of every torch function and Tensor method that ``fn`` calls (TorchFunctionMode)."""
    from torch.overrides import TorchFunctionMode

    names = set()

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            names.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return names


@pytest.mark.parametrize("per_level", [False, True])
def test_ghm_losses_use_no_syncing_op(per_level):
    """GHM-C and GHM-R (forward + backward, moving-average update) call no op that synchronises
    with the host on a GPU: checked by the ops used (a GPU run also checks with sync debug mode)."""
    torch.manual_seed(0)
    ghmc = GHMC(per_level=per_level)
    ghmr = GHMR(per_level=per_level)
    logits = torch.randn(2, 40, 3, requires_grad=True)
    targets = (torch.rand(2, 40, 3) < 0.1).float()
    valid = torch.rand(2, 40) < 0.9
    deltas = torch.randn(2, 40, 4, requires_grad=True)
    gt = torch.randn(2, 40, 4)

    def step():
        loss = ghmc(logits, targets, valid, [30, 10]) + ghmr.harmonize(deltas, gt, valid.unsqueeze(-1), [30, 10])
        loss.backward()

    used = _ops_called(step)
    assert "scatter_add_" in used  # the histogram
    assert not used & _SYNCING_OPS, used & _SYNCING_OPS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (sync debug mode is CUDA's)")
def test_ghm_losses_are_sync_free_on_cuda():
    ghmc, ghmr = GHMC().cuda(), GHMR().cuda()
    logits = torch.randn(2, 400, 3, device="cuda", requires_grad=True)
    targets = (torch.rand(2, 400, 3, device="cuda") < 0.1).float()
    valid = torch.rand(2, 400, device="cuda") < 0.9
    deltas = torch.randn(2, 400, 4, device="cuda", requires_grad=True)
    gt = torch.randn(2, 400, 4, device="cuda")
    ghmc(logits, targets, valid)  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ghmc(logits, targets, valid) + ghmr.harmonize(deltas, gt, valid.unsqueeze(-1))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_ghm_r_with_huge_targets_stays_finite():
    """Deltas whose square overflows float32 (|d| > 1.8e19, e.g. a degenerate anchor) give a finite
    loss and finite gradients: ASL1 is |d| - mu there and the gradient norm 1 (the last bin)."""
    ghmr = GHMR()
    pred = torch.zeros(1, 6, 4, requires_grad=True)
    target = torch.tensor([1e20, -3e25, 0.5, 0.01, 1e16, -1e19]).view(1, 6, 1).expand(1, 6, 4)
    loss = ghmr.harmonize(pred, target.contiguous())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    d = -target[0, :, 0]
    assert ghmr.gradient_norm(d)[[0, 1, 4, 5]].tolist() == [1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(ghmr.asl1(d)[:2], d[:2].abs() - 0.02)
    # unchanged where d^2 is representable
    small = torch.tensor([0.5, 0.01, -3.0])
    torch.testing.assert_close(ghmr.asl1(small), torch.sqrt(small * small + 0.02 ** 2) - 0.02,
                               rtol=0, atol=0)
