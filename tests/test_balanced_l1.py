"""Tests for the balanced L1 loss: the function, the ``BalancedL1Loss`` module ("balanced_l1" in
BOX_REG_LOSS_REGISTRY), Detectron2's types as LibraGHM loss modules, and the LibraGHM heads that
use them (LibraGHMROIHeads' box predictor, LibraGHMRPN, LibraGHMRetinaNet).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_balanced_l1.py -x -q
"""
import copy
import math
import pickle
import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling import box_regression as d2_box_regression
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch import retinanet as d2_retinanet
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.proposal_generator import rpn as d2_rpn
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads import fast_rcnn as d2_fast_rcnn
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from conftest import get_config, tiny_batch
from libraghm import add_libraghm_config
from libraghm.losses import BOX_REG_LOSS_REGISTRY, BalancedL1Loss, balanced_l1_loss, build_loss
from libraghm.losses.balanced_l1_loss import PARAMS as BL1_PARAMS
from libraghm.losses.box_regression import CIoULoss, DIoULoss, GIoULoss, SmoothL1Loss
from libraghm.modeling import (
    LibraGHMFastRCNNOutputLayers,
    LibraGHMROIHeads,
    LibraGHMRPN,
    LibraGHMRetinaNet,
)

ALPHA, GAMMA = 0.5, 1.5
B = math.exp(GAMMA / ALPHA) - 1.0  # alpha * ln(b + 1) = gamma


# -------------------------------------------------------------------------------------------------
# Independent closed forms (plain Python math), written from the paper's definition.
# -------------------------------------------------------------------------------------------------
def paper_L(x):
    """Paper's form at beta = 1."""
    if x < 1:
        return ALPHA / B * (B * x + 1) * math.log(B * x + 1) - ALPHA * x
    return GAMMA * x + (GAMMA / B - ALPHA)


def paper_dL(x):
    return ALPHA * math.log(B * x + 1) if x < 1 else GAMMA


def mmdet_L(x, beta):
    """mmdetection's form: beta only divides x inside the logarithm."""
    if x < beta:
        return ALPHA / B * (B * x + 1) * math.log(B * x / beta + 1) - ALPHA * x
    return GAMMA * x + GAMMA / B - ALPHA * beta


def _loss_and_grad(x_values, **kw):
    """Loss and d loss / d input at differences x (input = x, target = 0), float64."""
    x = torch.tensor(x_values, dtype=torch.float64, requires_grad=True)
    loss = balanced_l1_loss(x, torch.zeros_like(x), **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


# -------------------------------------------------------------------------------------------------
# The function
# -------------------------------------------------------------------------------------------------
def test_b_constant():
    assert B == pytest.approx(19.085536923187668, rel=1e-12)
    assert ALPHA * math.log(B + 1) == pytest.approx(GAMMA, rel=1e-12)


def test_paper_closed_form_values_and_gradients():
    xs = [0.0, 0.01, 0.05, 0.3, 0.7, 0.999, 1.0, 1.5, 3.0, 10.0]
    loss, grad = _loss_and_grad(xs)
    for x, l, g in zip(xs, loss.tolist(), grad.tolist()):
        assert l == pytest.approx(paper_L(x), rel=1e-9, abs=1e-15)
        if x > 0:
            assert g == pytest.approx(paper_dL(x), rel=1e-9, abs=1e-15)
    # Pinned values: L(1) = gamma + gamma/b - alpha; L is linear with slope gamma above 1.
    assert loss[6].item() == pytest.approx(1.0785935447368837, rel=1e-12)
    assert loss[7].item() - loss[6].item() == pytest.approx(0.5 * GAMMA, rel=1e-12)
    # An inlier gets more gradient than under smooth L1 with beta 1 (whose gradient is x).
    assert grad[3].item() == pytest.approx(0.5 * math.log(B * 0.3 + 1), rel=1e-12)
    assert grad[3].item() > 0.3


def test_sign_of_gradient_follows_prediction_minus_target():
    pred = torch.tensor([0.2, -0.2, 2.0, -2.0], dtype=torch.float64, requires_grad=True)
    loss = balanced_l1_loss(pred, torch.zeros_like(pred))
    (g,) = torch.autograd.grad(loss.sum(), pred)
    assert loss[0] == loss[1] and loss[2] == loss[3]
    assert g[0].item() == pytest.approx(paper_dL(0.2)) and g[1].item() == pytest.approx(-paper_dL(0.2))
    assert g[2].item() == pytest.approx(GAMMA) and g[3].item() == pytest.approx(-GAMMA)


@pytest.mark.parametrize("beta", [0.11, 0.5, 2.0])
def test_beta_scales_whole_function(beta):
    xs = [0.001, 0.03, 0.1, 0.109, 0.2, 0.6, 1.5, 4.0]
    loss, grad = _loss_and_grad(xs, beta=beta)
    for x, l, g in zip(xs, loss.tolist(), grad.tolist()):
        assert l == pytest.approx(beta * paper_L(x / beta), rel=1e-9)
        assert g == pytest.approx(paper_dL(x / beta), rel=1e-9)


@pytest.mark.parametrize("beta", [1.0, 0.11])
def test_paper_form_continuous_value_and_gradient_at_beta(beta):
    eps = 1e-9
    loss, grad = _loss_and_grad([beta - eps, beta, beta + eps], beta=beta)
    assert abs(loss[0] - loss[1]) < 1e-8 and abs(loss[2] - loss[1]) < 1e-8
    assert grad[0].item() == pytest.approx(GAMMA, abs=1e-6)
    assert grad[1].item() == pytest.approx(GAMMA, abs=1e-12)
    assert grad[2].item() == pytest.approx(GAMMA, abs=1e-12)


def test_paper_form_zero_gradient_at_zero():
    for beta in (1.0, 0.11):
        _, grad = _loss_and_grad([0.0, 1e-12], beta=beta)
        assert grad[0].item() == 0.0
        assert abs(grad[1].item()) < 1e-9


def test_mmdet_compat_gradient_kinks():
    """mmdetection's form at beta = 0.11: gradient 4.04 at 0+, jump 1.70 -> 1.50 at beta."""
    beta, eps = 0.11, 1e-10
    loss, grad = _loss_and_grad([eps, beta - eps, beta, beta + eps], beta=beta, mmdet_compat=True)
    assert grad[0].item() == pytest.approx(4.04, abs=0.006)
    assert grad[0].item() == pytest.approx(ALPHA * (1 / beta - 1), rel=1e-6)
    assert grad[1].item() == pytest.approx(1.70, abs=0.005)
    assert grad[1].item() == pytest.approx(
        GAMMA + ALPHA * ((B * beta + 1) / (beta * (B + 1)) - 1), rel=1e-6
    )
    assert grad[2].item() == pytest.approx(1.50, abs=1e-12)
    assert grad[3].item() == pytest.approx(1.50, abs=1e-12)
    # value still continuous at beta
    assert abs(loss[1] - loss[2]) < 1e-8 and abs(loss[3] - loss[2]) < 1e-8
    # and the values are mmdetection's formula everywhere
    xs = [0.0, 0.02, 0.1, 0.3, 2.0]
    loss, _ = _loss_and_grad(xs, beta=beta, mmdet_compat=True)
    for x, l in zip(xs, loss.tolist()):
        assert l == pytest.approx(mmdet_L(x, beta), rel=1e-9, abs=1e-15)
    # ... which differs from the paper-correct scaling
    paper, _ = _loss_and_grad(xs, beta=beta)
    assert not torch.allclose(loss[1:], paper[1:])


def test_mmdet_compat_equals_paper_at_beta_one():
    xs = [0.0, 0.1, 0.5, 0.99, 1.0, 3.0]
    a, ga = _loss_and_grad(xs, beta=1.0)
    b, gb = _loss_and_grad(xs, beta=1.0, mmdet_compat=True)
    assert torch.allclose(a, b, rtol=1e-14, atol=0) and torch.allclose(ga, gb, rtol=1e-14, atol=0)


@pytest.mark.parametrize("mmdet_compat", [False, True])
@pytest.mark.parametrize("beta", [1.0, 0.11])
def test_gradcheck_float64(beta, mmdet_compat):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(40, 4, dtype=torch.float64, generator=g) * 2 * beta
    target = torch.randn(40, 4, dtype=torch.float64, generator=g) * 2 * beta
    # keep points away from the kinks (x = 0 for |.|, x = beta for the mmdet form)
    x = (pred - target).abs()
    bad = (x < 1e-3) | ((x - beta).abs() < 1e-3)
    pred[bad] += 0.01
    pred.requires_grad_(True)
    target.requires_grad_(True)

    def f(p, t):
        return balanced_l1_loss(p, t, beta=beta, mmdet_compat=mmdet_compat)

    assert torch.autograd.gradcheck(f, (pred, target), eps=1e-6, atol=1e-7)


def test_gradcheck_broadcast_target_and_exact_zero_difference():
    g = torch.Generator().manual_seed(1)
    pred = (torch.randn(6, 4, dtype=torch.float64, generator=g) + 3.0).requires_grad_(True)
    target = torch.randn(1, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p, t: balanced_l1_loss(p, t, beta=0.11, reduction="sum"), (pred, target), eps=1e-6
    )
    # At d == 0 exactly the gradient is 0 (|d|'s subgradient), in both forms.
    for compat in (False, True):
        p = torch.zeros(3, requires_grad=True)
        balanced_l1_loss(p, torch.zeros(3), beta=0.11, mmdet_compat=compat, reduction="sum").backward()
        assert torch.equal(p.grad, torch.zeros(3))


def test_reductions_and_empty_input():
    p = torch.tensor([[0.3, -2.0], [0.0, 1.2]])
    t = torch.zeros_like(p)
    none = balanced_l1_loss(p, t)
    assert none.shape == p.shape
    assert balanced_l1_loss(p, t, reduction="sum").item() == pytest.approx(none.sum().item())
    assert balanced_l1_loss(p, t, reduction="mean").item() == pytest.approx(none.mean().item())
    empty = torch.zeros(0, 4, requires_grad=True)
    for red in ("sum", "mean"):
        v = balanced_l1_loss(empty, torch.zeros(0, 4), reduction=red)
        assert v.item() == 0.0 and torch.isfinite(v)
        v.backward()
    with pytest.raises(ValueError, match=r"reduction = 'avg' is invalid: expected"):
        balanced_l1_loss(p, t, reduction="avg")


def test_huge_differences_stay_finite():
    p = torch.tensor([1e20, -1e20, 1e6], requires_grad=True)
    loss = balanced_l1_loss(p, torch.zeros(3), beta=0.11, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    assert p.grad.tolist() == [GAMMA, -GAMMA, GAMMA]


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"alpha": 0.0}, r"alpha = 0\.0 is invalid: expected a finite number > 0"),
        ({"gamma": -1.0}, r"gamma = -1\.0 is invalid: expected a finite number > 0"),
        ({"beta": 0.0}, r"beta = 0\.0 is invalid: expected a finite number > 0"),
        ({"beta": float("nan")}, r"beta = nan is invalid: expected a finite number"),
        ({"alpha": 0.01, "gamma": 1.5}, r"gamma / alpha = 1\.5 / 0\.01 is invalid: .*<= 50"),
        ({"mmdet_compat": 1}, r"mmdet_compat = 1 is invalid: expected True or False"),
    ],
)
def test_function_and_module_reject_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        balanced_l1_loss(torch.zeros(2), torch.zeros(2), **kw)
    with pytest.raises(ValueError, match=match):
        BalancedL1Loss(**kw)


def test_params_table_is_the_oracle():
    """Every parameter's spec accepts the defaults and rejects what the error messages describe."""
    assert set(BL1_PARAMS) == {"alpha", "gamma", "beta", "mmdet_compat"}
    for name in ("alpha", "gamma", "beta"):
        spec = BL1_PARAMS[name]
        assert spec.describe() == "a finite number > 0"
        assert spec.is_valid(1e-6) and spec.is_valid(3)
        assert not any(spec.is_valid(v) for v in (0.0, -1.0, float("inf"), float("nan"), True, "1"))
    assert BL1_PARAMS["mmdet_compat"].is_valid(False)
    assert not BL1_PARAMS["mmdet_compat"].is_valid(0)


# -------------------------------------------------------------------------------------------------
# The loss modules (Detectron2's dense format)
# -------------------------------------------------------------------------------------------------
def _dense_inputs(seed=0, num_images=2, fg_fraction=0.3, requires_grad=True):
    """Two levels of anchors, per-image matched boxes and predictions, and a foreground mask."""
    g = torch.Generator().manual_seed(seed)

    def rand_boxes(n):
        xy = torch.rand(n, 2, generator=g) * 100
        wh = torch.rand(n, 2, generator=g) * 40 + 4
        return torch.cat([xy, xy + wh], dim=1)

    sizes = [30, 12]
    anchors = [Boxes(rand_boxes(n)) for n in sizes]
    R = sum(sizes)
    gt = [rand_boxes(R) for _ in range(num_images)]
    preds = [(torch.randn(num_images, n, 4, generator=g) * 0.5) for n in sizes]
    if requires_grad:
        for p in preds:
            p.requires_grad_(True)
    fg = torch.rand(num_images, R, generator=g) < fg_fraction
    return anchors, preds, gt, fg


def _fg_deltas(anchors, b2b, preds, gt, fg):
    """Predicted and target deltas of the foreground boxes, computed independently."""
    all_anchors = torch.cat([a.tensor if isinstance(a, Boxes) else a for a in anchors])
    target = torch.stack([b2b.get_deltas(all_anchors, g) for g in gt])[fg]
    return torch.cat(preds, dim=1)[fg], target


def test_stock_detectron2_is_untouched():
    """Importing LibraGHM rebinds nothing in Detectron2: its dense loss function and the stock
    heads' builders are Detectron2's own, and stock heads reject LibraGHM's loss types."""
    fn = d2_box_regression._dense_box_regression_loss
    assert fn.__module__ == "detectron2.modeling.box_regression"
    assert fn.__code__.co_filename.endswith("detectron2/modeling/box_regression.py")
    for mod in (d2_fast_rcnn, d2_rpn, d2_retinanet):
        assert mod._dense_box_regression_loss is fn
    for cls in (FastRCNNOutputLayers, RPN, RetinaNet):
        func = cls.from_config.__func__
        assert func.__module__.startswith("detectron2.modeling."), cls
        assert func.__qualname__ == f"{cls.__name__}.from_config"
        assert not hasattr(func, "__wrapped__") and not hasattr(func, "_libraghm_original")
    for method in (FastRCNNOutputLayers.box_reg_loss, FastRCNNOutputLayers.losses, RPN.losses,
                   RPN._subsample_labels, RetinaNet.losses, StandardROIHeads._sample_proposals):
        assert method.__module__.startswith("detectron2.modeling."), method
    # A stock box predictor does not accept LibraGHM's types (Detectron2's own error).
    head = FastRCNNOutputLayers(
        ShapeSpec(channels=8), box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
        num_classes=3, box_reg_loss_type="balanced_l1",
    )
    anchors, _, gt, fg = _dense_inputs(num_images=1, requires_grad=False)
    props = torch.cat([a.tensor for a in anchors])
    gt_classes = torch.where(fg[0], 1, 3)
    for name in ("balanced_l1", "ghm_r"):
        head.box_reg_loss_type = name
        with pytest.raises(ValueError, match="Invalid dense box regression loss type"):
            head.box_reg_loss(props, gt[0], torch.zeros(props.shape[0], 12), gt_classes)
    # ... and stock RPN / RetinaNet call the same unpatched function.
    b2b = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    anchors, preds, gt, fg = _dense_inputs()
    with pytest.raises(ValueError, match="Invalid dense box regression loss type"):
        d2_rpn._dense_box_regression_loss(anchors, b2b, preds, gt, fg, "balanced_l1")


def test_registry_names_and_classes():
    assert BOX_REG_LOSS_REGISTRY.names() == [
        "balanced_l1", "ciou", "diou", "ghm_r", "giou", "huber", "smooth_l1"
    ]
    assert BOX_REG_LOSS_REGISTRY.get("balanced_l1") is BalancedL1Loss
    assert BOX_REG_LOSS_REGISTRY.get("smooth_l1") is SmoothL1Loss
    assert BalancedL1Loss.normalized is False  # summed: the head normalises


@pytest.mark.parametrize(
    "make,loss_type,beta",
    [
        (lambda: SmoothL1Loss(0.0), "smooth_l1", 0.0),
        (lambda: SmoothL1Loss(0.1), "smooth_l1", 0.1),
        (GIoULoss, "giou", 0.0),
        (DIoULoss, "diou", 0.0),
        (CIoULoss, "ciou", 0.0),
    ],
)
def test_detectron2_types_bit_identical_to_detectron2(make, loss_type, beta):
    """LibraGHM's modules for Detectron2's types give Detectron2's loss and gradients, bit for bit."""
    b2b = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    results = []
    for fn in (
        lambda *a: d2_box_regression._dense_box_regression_loss(
            *a, box_reg_loss_type=loss_type, smooth_l1_beta=beta
        ),
        make(),
    ):
        anchors, preds, gt, fg = _dense_inputs()
        loss = fn(anchors, b2b, preds, gt, fg)
        results.append((loss, torch.autograd.grad(loss, preds)))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss", [SmoothL1Loss(0.1), GIoULoss(), DIoULoss(), CIoULoss()])
def test_detectron2_types_per_box_sums_to_forward(loss):
    b2b = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    anchors, preds, gt, fg = _dense_inputs(num_images=1, requires_grad=False)
    props = torch.cat([a.tensor for a in anchors])
    pred = torch.cat(preds, dim=1)[0]
    per_box = loss.per_box(props[fg[0]], gt[0][fg[0]], pred[fg[0]], b2b)
    assert per_box.shape == (int(fg.sum()),) and (per_box >= 0).all()
    total = loss(anchors, b2b, preds, gt, fg)
    assert per_box.sum().item() == pytest.approx(total.item(), rel=1e-5)


@pytest.mark.parametrize(
    "kw", [{}, {"beta": 0.11}, {"beta": 0.11, "mmdet_compat": True}, {"alpha": 0.3, "gamma": 2.0}]
)
def test_balanced_l1_module_is_sum_over_foreground_deltas(kw):
    b2b = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    anchors, preds, gt, fg = _dense_inputs()
    pred, target = _fg_deltas(anchors, b2b, preds, gt, fg)
    loss = BalancedL1Loss(**kw)
    got = loss(anchors, b2b, preds, gt, fg)
    want = balanced_l1_loss(pred, target, reduction="sum", **kw)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    # The gradient reaches exactly the foreground predictions.
    grads = torch.cat(torch.autograd.grad(got, preds), dim=1)
    assert (grads[~fg] == 0).all() and (grads[fg].abs().sum(dim=1) > 0).all()
    # Anchors as tensors (as the RPN passes them) and the Ellipsis mask (all boxes).
    tensors = [a.tensor for a in anchors]
    assert torch.allclose(loss(tensors, b2b, preds, gt, fg), want, rtol=1e-6, atol=0)
    all_anchors = torch.cat(tensors)
    one = [p[:1] for p in preds]
    got_all = loss([all_anchors], b2b, [torch.cat(one, 1)], gt[:1], ...)
    want_all = balanced_l1_loss(
        torch.cat(one, 1)[0], b2b.get_deltas(all_anchors, gt[0]), reduction="sum", **kw
    )
    assert torch.allclose(got_all, want_all, rtol=1e-6, atol=0)


def test_balanced_l1_elementwise_and_per_box_use_their_params():
    g = torch.Generator().manual_seed(5)
    p, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    loss = BalancedL1Loss(beta=0.11, mmdet_compat=True)
    assert loss.params == {"alpha": 0.5, "gamma": 1.5, "beta": 0.11, "mmdet_compat": True}
    got = loss.elementwise(p, t)
    assert got.shape == (5, 4)
    assert torch.equal(got, balanced_l1_loss(p, t, beta=0.11, mmdet_compat=True))
    assert torch.equal(BalancedL1Loss().elementwise(p, t), balanced_l1_loss(p, t))
    # per_box: one value per box, the sum of its coordinates' losses; sums to forward.
    b2b = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    anchors, preds, gt, fg = _dense_inputs(num_images=1, requires_grad=False)
    props = torch.cat([a.tensor for a in anchors])
    pred = torch.cat(preds, dim=1)[0]
    per_box = loss.per_box(props[fg[0]], gt[0][fg[0]], pred[fg[0]], b2b)
    target = b2b.get_deltas(props[fg[0]], gt[0][fg[0]])
    assert torch.allclose(per_box, loss.elementwise(pred[fg[0]], target).sum(dim=1))
    total = loss(anchors, b2b, preds, gt, fg)
    assert per_box.sum().item() == pytest.approx(total.item(), rel=1e-6)


def test_balanced_l1_module_copies_and_pickles_with_its_params():
    loss = BalancedL1Loss(alpha=0.4, beta=0.11, mmdet_compat=True)
    for c in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
        assert c.params == loss.params
        p, t = torch.randn(3, 4), torch.randn(3, 4)
        assert torch.equal(c.elementwise(p, t), loss.elementwise(p, t))
    assert "beta=0.11" in repr(loss) and "mmdet_compat=True" in repr(loss)


def test_balanced_l1_no_positives_gives_finite_zero():
    b2b = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    anchors, preds, gt, fg = _dense_inputs()
    loss = BalancedL1Loss()(anchors, b2b, preds, gt, torch.zeros_like(fg))
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in preds)


def test_unknown_type_raises_clear_error():
    cfg = _bl1_cfg()
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "balanced_L1"
    with pytest.raises(
        ValueError,
        match=r"MODEL\.ROI_BOX_HEAD\.BBOX_REG_LOSS_TYPE = 'balanced_L1' is invalid: expected one of "
        r"\['balanced_l1', 'ciou', 'diou', 'ghm_r', 'giou', 'huber', 'smooth_l1'\]",
    ):
        build_loss(BOX_REG_LOSS_REGISTRY, cfg, "MODEL.ROI_BOX_HEAD", "BBOX_REG_LOSS_TYPE")


# -------------------------------------------------------------------------------------------------
# Building from a config, and config validation
# -------------------------------------------------------------------------------------------------
def _predictor(cfg):
    return LibraGHMFastRCNNOutputLayers(cfg, ShapeSpec(channels=8))


def _bl1_cfg(**bl1):
    cfg = get_cfg()
    add_libraghm_config(cfg)
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "balanced_l1"
    for k, v in bl1.items():
        setattr(cfg.MODEL.BALANCED_L1, k, v)
    return cfg


def test_config_defaults():
    cfg = get_cfg()
    add_libraghm_config(cfg)
    c = cfg.MODEL.BALANCED_L1
    assert (c.ALPHA, c.GAMMA, c.BETA, c.MMDET_COMPAT) == (0.5, 1.5, 1.0, False)


def test_old_config_keys_name_the_new_ones():
    for old in ("LIBRAGHM.BALANCED_L1.BETA", "LIBRAGHM.BALANCED_L1.MMDET_COMPAT"):
        new = old.replace("LIBRAGHM.", "MODEL.")
        with pytest.raises(KeyError, match=re.escape(f"{old} was renamed to {new}")):
            get_config("Shapes-Detection/retinanet_balanced_l1.yaml", old, 0.5)


def test_predictor_builds_the_configured_loss_module():
    p = _predictor(_bl1_cfg(BETA=0.11, MMDET_COMPAT=True))
    assert isinstance(p.box_regression_loss, BalancedL1Loss)
    assert p.box_reg_loss_type == "balanced_l1"
    assert p.box_regression_loss.params == {
        "alpha": 0.5, "gamma": 1.5, "beta": 0.11, "mmdet_compat": True
    }
    # Detectron2's types become LibraGHM's modules for them, with the head's beta.
    cfg = get_cfg()
    add_libraghm_config(cfg)
    cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.25
    sl1 = _predictor(cfg).box_regression_loss
    assert type(sl1) is SmoothL1Loss and sl1.smooth_l1_beta == 0.25
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "giou"
    assert type(_predictor(cfg).box_regression_loss) is GIoULoss
    # Explicit construction: default smooth L1 with the given beta, or any loss module.
    kw = dict(box2box_transform=Box2BoxTransform((1.0, 1.0, 1.0, 1.0)), num_classes=3)
    q = LibraGHMFastRCNNOutputLayers(ShapeSpec(channels=8), smooth_l1_beta=0.5, **kw)
    assert type(q.box_regression_loss) is SmoothL1Loss and q.box_regression_loss.smooth_l1_beta == 0.5
    r = LibraGHMFastRCNNOutputLayers(ShapeSpec(channels=8), box_reg_loss=BalancedL1Loss(beta=0.2), **kw)
    assert r.box_reg_loss_type == "balanced_l1" and r.box_regression_loss.params["beta"] == 0.2
    with pytest.raises(TypeError, match="BoxRegressionLoss"):
        LibraGHMFastRCNNOutputLayers(ShapeSpec(channels=8), box_reg_loss="balanced_l1", **kw)


@pytest.mark.parametrize(
    "key,value", [("ALPHA", 0.0), ("ALPHA", -0.5), ("GAMMA", 0.0), ("GAMMA", float("inf")),
                  ("BETA", 0.0), ("BETA", -1.0), ("BETA", float("nan")), ("MMDET_COMPAT", "yes")]
)
def test_bad_values_fail_at_build_time_naming_the_key(key, value):
    expected = BL1_PARAMS[key.lower()].describe()
    with pytest.raises(ValueError) as info:
        _predictor(_bl1_cfg(**{key: value}))
    assert str(info.value) == f"MODEL.BALANCED_L1.{key} = {value!r} is invalid: expected {expected}."


def test_bad_ratio_fails_at_build_time():
    with pytest.raises(
        ValueError,
        match=r"MODEL\.BALANCED_L1\.GAMMA / MODEL\.BALANCED_L1\.ALPHA = 1\.5 / 0\.01 is invalid",
    ):
        _predictor(_bl1_cfg(ALPHA=0.01, GAMMA=1.5))


def test_missing_libraghm_config_is_a_clear_error_for_the_rpn():
    cfg = get_cfg()  # Detectron2's keys only
    cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE = "balanced_l1"
    with pytest.raises(KeyError, match="add_libraghm_config"):
        LibraGHMRPN(cfg, {"res4": ShapeSpec(channels=8, stride=16)})


def test_missing_libraghm_config_is_a_clear_error_for_the_predictor():
    cfg = get_cfg()
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "balanced_l1"
    with pytest.raises((KeyError, ValueError), match="add_libraghm_config"):
        _predictor(cfg)


@pytest.mark.parametrize(
    "rel,opts,key",
    [
        ("Shapes-Detection/faster_rcnn_balanced_l1.yaml",
         ["MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.BBOX_REG_LOSS_TYPE", "balanced_l1",
          "MODEL.BALANCED_L1.BETA", -0.1],
         r"MODEL\.BALANCED_L1\.BETA = -0\.1 is invalid: expected a finite number > 0"),
        ("Shapes-Detection/retinanet_balanced_l1.yaml", ["MODEL.BALANCED_L1.ALPHA", 0.0],
         r"MODEL\.BALANCED_L1\.ALPHA = 0\.0 is invalid: expected a finite number > 0"),
        ("Shapes-Detection/faster_rcnn_balanced_l1.yaml",
         ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "balancedl1"],
         r"MODEL\.ROI_BOX_HEAD\.BBOX_REG_LOSS_TYPE = 'balancedl1' is invalid: expected one of .*"
         r"'balanced_l1'"),
        ("Shapes-Detection/faster_rcnn_balanced_l1.yaml",
         ["MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.BBOX_REG_LOSS_TYPE", "l2"],
         r"MODEL\.RPN\.BBOX_REG_LOSS_TYPE = 'l2' is invalid: expected one of .*'giou'"),
        ("Shapes-Detection/retinanet_balanced_l1.yaml",
         ["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "l2"],
         r"MODEL\.RETINANET\.BBOX_REG_LOSS_TYPE = 'l2' is invalid: expected one of .*'giou'"),
    ],
)
def test_whole_model_build_fails_on_bad_config(rel, opts, key):
    cfg = get_config(rel, *opts)
    with pytest.raises(ValueError, match=key):
        build_model(cfg)


def test_my_configs_load():
    expect = {
        "Shapes-Detection/faster_rcnn_balanced_l1.yaml": ("ROI_BOX_HEAD", 1.0),
        "COCO-Detection/faster_rcnn_balanced_l1_R_50_FPN_1x.yaml": ("ROI_BOX_HEAD", 1.0),
        "Shapes-Detection/retinanet_balanced_l1.yaml": ("RETINANET", 0.11),
        "COCO-Detection/retinanet_balanced_l1_R_50_FPN_1x.yaml": ("RETINANET", 0.11),
    }
    for rel, (head, beta) in expect.items():
        cfg = get_config(rel, tiny=False)
        assert cfg.MODEL[head].BBOX_REG_LOSS_TYPE == "balanced_l1"
        assert cfg.MODEL.BALANCED_L1.BETA == beta and not cfg.MODEL.BALANCED_L1.MMDET_COMPAT
        # the head that reads the type is LibraGHM's
        if head == "ROI_BOX_HEAD":
            assert cfg.MODEL.ROI_HEADS.NAME == "LibraGHMROIHeads"
        else:
            assert cfg.MODEL.META_ARCHITECTURE == "LibraGHMRetinaNet"


# -------------------------------------------------------------------------------------------------
# LibraGHM heads: the value of each head's balanced L1 loss, training steps, stock equivalence
# -------------------------------------------------------------------------------------------------
def _train_step(model, batch, seed=0):
    model.train()
    torch.manual_seed(seed)
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    model.zero_grad()
    total.backward()
    return losses


_BL1 = {"alpha": 0.4, "gamma": 1.6, "beta": 0.3, "mmdet_compat": False}
_BL1_OPTS = ["MODEL.BALANCED_L1.ALPHA", _BL1["alpha"], "MODEL.BALANCED_L1.GAMMA", _BL1["gamma"],
             "MODEL.BALANCED_L1.BETA", _BL1["beta"]]


def test_roi_head_loss_is_balanced_l1_over_foreground_rois_per_sampled_roi():
    """LibraGHMROIHeads' box predictor: loss_box_reg = BBOX_REG_LOSS_WEIGHT x sum of balanced L1
    over the foreground RoIs' deltas (of their ground-truth class) / number of RoIs."""
    model = build_model(get_config(
        "Shapes-Detection/faster_rcnn_balanced_l1.yaml", *_BL1_OPTS,
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", 2.0,
    ))
    assert isinstance(model.roi_heads, LibraGHMROIHeads)
    predictor = model.roi_heads.box_predictor
    assert isinstance(predictor, LibraGHMFastRCNNOutputLayers)
    assert predictor.box_regression_loss.params == _BL1
    K = predictor.num_classes
    g = torch.Generator().manual_seed(3)
    anchors, _, gt, fg = _dense_inputs(seed=1, num_images=2)
    props = torch.cat([a.tensor for a in anchors])
    R = props.shape[0]
    proposals, classes = [], []
    for i in range(2):
        inst = Instances((128, 160))
        inst.proposal_boxes = Boxes(props)
        inst.gt_boxes = Boxes(gt[i])
        cls = torch.where(fg[i], torch.randint(0, K, (R,), generator=g), torch.tensor(K))
        inst.gt_classes = cls
        proposals.append(inst)
        classes.append(cls)
    scores = torch.randn(2 * R, K + 1, generator=g)
    deltas = torch.randn(2 * R, K * 4, generator=g).requires_grad_(True)
    with EventStorage():
        losses = predictor.losses((scores, deltas), proposals)
    gt_classes = torch.cat(classes)
    fg_all = gt_classes < K
    fg_pred = deltas.view(-1, K, 4)[fg_all, gt_classes[fg_all]]
    target = predictor.box2box_transform.get_deltas(
        torch.cat([props, props])[fg_all], torch.cat(gt)[fg_all]
    )
    want = 2.0 * balanced_l1_loss(fg_pred, target, reduction="sum", **_BL1) / (2 * R)
    assert int(fg_all.sum()) > 0
    assert torch.allclose(losses["loss_box_reg"], want, rtol=1e-6, atol=0)


def test_rpn_loss_is_balanced_l1_over_positive_anchors_per_batch_size():
    """LibraGHMRPN: loss_rpn_loc = BBOX_REG_LOSS_WEIGHT x sum of balanced L1 over the positive
    anchors' deltas / (BATCH_SIZE_PER_IMAGE x images), as Detectron2 normalises smooth L1."""
    model = build_model(get_config(
        "Shapes-Detection/faster_rcnn_balanced_l1.yaml", *_BL1_OPTS,
        "MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.BBOX_REG_LOSS_TYPE", "balanced_l1",
        "MODEL.RPN.BBOX_REG_LOSS_WEIGHT", 3.0,
    ))
    rpn = model.proposal_generator
    assert isinstance(rpn, LibraGHMRPN) and isinstance(rpn.box_reg_loss, BalancedL1Loss)
    assert rpn.box_reg_loss.params == _BL1
    anchors, preds, gt, fg = _dense_inputs(seed=2)
    N = fg.shape[0]
    labels = [torch.where(f, 1, 0) for f in fg]
    labels[0][:3] = -1  # ignored anchors are not positives
    logits = [torch.zeros(N, a.tensor.shape[0]) for a in anchors]
    with EventStorage():
        losses = rpn.losses(anchors, logits, labels, preds, gt)
    pos = torch.stack(labels) == 1
    pred, target = _fg_deltas(anchors, rpn.box2box_transform, preds, gt, pos)
    normaliser = rpn.batch_size_per_image * N
    want = 3.0 * balanced_l1_loss(pred, target, reduction="sum", **_BL1) / normaliser
    assert rpn.loss_weight["loss_rpn_loc"] == 3.0
    assert torch.allclose(losses["loss_rpn_loc"], want, rtol=1e-6, atol=0)


def test_retinanet_loss_is_balanced_l1_over_positives_per_moving_average():
    """LibraGHMRetinaNet: loss_box_reg = sum of balanced L1 over the positive anchors' deltas /
    Detectron2's moving average of the number of positives (100 at start, momentum 0.9)."""
    model = build_model(get_config("Shapes-Detection/retinanet_balanced_l1.yaml", *_BL1_OPTS))
    assert isinstance(model, LibraGHMRetinaNet) and isinstance(model.box_reg_loss, BalancedL1Loss)
    assert model.box_reg_loss.params == _BL1
    K = model.num_classes
    anchors, preds, gt, fg = _dense_inputs(seed=4)
    N, R = fg.shape
    labels = [torch.where(f, 2, K) for f in fg]
    labels[1][:4] = -1
    logits = [torch.zeros(N, a.tensor.shape[0], K) for a in anchors]
    pos = (torch.stack(labels) >= 0) & (torch.stack(labels) < K)
    pred, target = _fg_deltas(anchors, model.box2box_transform, preds, gt, pos)
    sum_bl1 = balanced_l1_loss(pred, target, reduction="sum", **_BL1)
    normaliser = 100.0
    for _ in range(2):  # the moving average moves: 0.9 x previous + 0.1 x positives
        normaliser = 0.9 * normaliser + 0.1 * int(pos.sum())
        with EventStorage():
            losses = model.losses(anchors, logits, labels, preds, gt)
        assert model.loss_normalizer.item() == pytest.approx(normaliser, rel=1e-12)
        assert torch.allclose(losses["loss_box_reg"], sum_bl1 / normaliser, rtol=1e-6, atol=0)


def test_faster_rcnn_roi_and_rpn_balanced_l1_train_steps():
    cfg = get_config(
        "Shapes-Detection/faster_rcnn_balanced_l1.yaml", "MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN",
        "MODEL.RPN.BBOX_REG_LOSS_TYPE", "balanced_l1",
    )
    model = build_model(cfg)
    for loss in (model.roi_heads.box_predictor.box_regression_loss, model.proposal_generator.box_reg_loss):
        assert isinstance(loss, BalancedL1Loss) and loss.params["beta"] == 1.0
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = tiny_batch(2)
    for step in range(2):
        losses = _train_step(model, batch, seed=step)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        assert losses["loss_box_reg"] > 0 and losses["loss_rpn_loc"] > 0
        g = model.roi_heads.box_predictor.bbox_pred.weight.grad
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        opt.step()
    # Images without ground truth: finite, no box loss.
    losses = _train_step(model, tiny_batch(2, with_gt=(False, False)))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_rpn_loc"].item() == 0.0


def test_retinanet_balanced_l1_train_steps():
    cfg = get_config("Shapes-Detection/retinanet_balanced_l1.yaml")
    model = build_model(cfg)
    assert model.box_reg_loss.params["beta"] == 0.11
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    batch = tiny_batch(2)
    for step in range(2):
        losses = _train_step(model, batch, seed=step)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        assert losses["loss_box_reg"] > 0
        opt.step()
    losses = _train_step(model, tiny_batch(2, with_gt=(False, False)))
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box_reg"].item() == 0.0


_LIBRA_HEADS = ["MODEL.ROI_HEADS.NAME", "LibraGHMROIHeads", "MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN"]


@pytest.mark.parametrize(
    "rel,opts",
    [
        ("Shapes-Detection/faster_rcnn_small_R_FPN.yaml", ["MODEL.RPN.SMOOTH_L1_BETA", 0.111]),
        ("Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
         ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "giou", "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", 0.5]),
        ("Shapes-Detection/retinanet_small_R_FPN.yaml", ["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "giou"]),
    ],
)
def test_libraghm_heads_with_detectron2_types_equal_stock_heads(rel, opts):
    """With Detectron2's loss types, LibraGHM's heads compute the stock heads' losses and
    gradients (same weights, same batch, same seed)."""
    stock = build_model(get_config(rel, *opts))
    retina = "retinanet" in rel
    libra_opts = ["MODEL.META_ARCHITECTURE", "LibraGHMRetinaNet"] if retina else _LIBRA_HEADS
    libra = build_model(get_config(rel, *opts, *libra_opts))
    missing, unexpected = libra.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and missing == (["loss_normalizer"] if retina else [])
    batch = tiny_batch(2)
    out = []
    for model in (stock, libra):
        losses = _train_step(model, batch, seed=7)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append(({k: v.detach() for k, v in losses.items()}, grads))
    (ls, gs), (ll, gl) = out
    assert ls.keys() == ll.keys() and gs.keys() == gl.keys()
    for k in ls:
        assert torch.equal(ll[k], ls[k]), (k, ll[k], ls[k])
    # Gradients equal up to rounding (LibraGHMRetinaNet divides by its normaliser as a float32
    # tensor where Detectron2 divides by a Python float): ~1e-6 of each tensor's largest entry.
    for n in gs:
        assert torch.allclose(gl[n], gs[n], rtol=1e-5, atol=1e-5 * float(gs[n].abs().max())), n


def test_two_models_keep_their_own_parameters():
    a = build_model(get_config("Shapes-Detection/retinanet_balanced_l1.yaml"))
    b = build_model(get_config("Shapes-Detection/retinanet_balanced_l1.yaml",
                               "MODEL.BALANCED_L1.BETA", 1.0, "MODEL.BALANCED_L1.MMDET_COMPAT", True))
    assert a.box_reg_loss.params["beta"] == 0.11 and not a.box_reg_loss.params["mmdet_compat"]
    assert b.box_reg_loss.params["beta"] == 1.0 and b.box_reg_loss.params["mmdet_compat"]


_COMPOSE_CASES = [
    # (id, base config, opts)
    ("iou_balanced_roi_and_rpn", "Shapes-Detection/faster_rcnn_balanced_l1.yaml",
     ["MODEL.ROI_HEADS.SAMPLER", "IoUBalancedSampler", "MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN",
      "MODEL.RPN.SAMPLER", "IoUBalancedSampler", "MODEL.RPN.BBOX_REG_LOSS_TYPE", "balanced_l1"]),
    ("ghm_c_objectness_rpn", "Shapes-Detection/faster_rcnn_balanced_l1.yaml",
     ["MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.OBJECTNESS_LOSS_TYPE", "ghm_c",
      "MODEL.RPN.SAMPLER", "NoSampling", "MODEL.RPN.BBOX_REG_LOSS_TYPE", "balanced_l1"]),
    ("ohem_mmdet", "Shapes-Detection/faster_rcnn_balanced_l1.yaml",
     ["MODEL.ROI_HEADS.SAMPLER", "OHEMSampler", "MODEL.ROI_HEADS.OHEM.MODE", "mmdet"]),
    ("ohem_paper", "Shapes-Detection/faster_rcnn_balanced_l1.yaml",
     ["MODEL.ROI_HEADS.SAMPLER", "OHEMSampler", "MODEL.ROI_HEADS.OHEM.MODE", "paper"]),
    ("ghm_c_retinanet", "Shapes-Detection/retinanet_balanced_l1.yaml",
     ["MODEL.RETINANET.CLS_LOSS_TYPE", "ghm_c"]),
]


@pytest.mark.parametrize("rel,opts", [c[1:] for c in _COMPOSE_CASES], ids=[c[0] for c in _COMPOSE_CASES])
def test_composes_with_samplers_and_other_losses(rel, opts, monkeypatch):
    """balanced_l1 trains in every LibraGHM head next to other samplers and losses, and is what
    computes the box loss there."""
    model = build_model(get_config(rel, *opts))
    if isinstance(model, LibraGHMRetinaNet):
        heads = [model.box_reg_loss]
    else:
        heads = [model.roi_heads.box_predictor.box_regression_loss]
        if "MODEL.RPN.BBOX_REG_LOSS_TYPE" in opts:
            heads.append(model.proposal_generator.box_reg_loss)
    assert all(isinstance(h, BalancedL1Loss) for h in heads)
    calls = []
    forward = BalancedL1Loss.forward

    def counting(self, *a, **k):
        calls.append(id(self))
        return forward(self, *a, **k)

    monkeypatch.setattr(BalancedL1Loss, "forward", counting)
    losses = _train_step(model, tiny_batch(2))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert {id(h) for h in heads} <= set(calls)
    assert losses["loss_box_reg"] > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sums_do_not_overflow(dtype):
    """Summed in half precision, 100k box-delta errors of ~1.5 would overflow fp16 (65504): the
    reductions accumulate in float32 and equal the float32 loss of the same half-precision values."""
    torch.manual_seed(0)
    pred = (torch.randn(25000, 4) * 2).to(dtype)
    target = torch.zeros(25000, 4, dtype=dtype)
    for reduction in ("sum", "mean"):
        half = balanced_l1_loss(pred, target, reduction=reduction)
        full = balanced_l1_loss(pred.float(), target.float(), reduction=reduction)
        assert torch.isfinite(half)
        torch.testing.assert_close(half.float(), full, rtol=2e-2, atol=0)
    loss = BalancedL1Loss()
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=dtype).repeat(25000, 1)
    b2b = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    fg = torch.ones(1, 25000, dtype=torch.bool)
    dense = loss([anchors], b2b, [pred.unsqueeze(0)], [anchors], fg)
    assert dense.dtype == torch.float32 and torch.isfinite(dense) and float(dense) > 65504
