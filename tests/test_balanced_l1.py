"""Tests for the balanced L1 loss and the box-regression loss-type dispatcher.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_balanced_l1.py -x -q
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling import box_regression as d2_box_regression
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch import retinanet as d2_retinanet
from detectron2.modeling.proposal_generator import rpn as d2_rpn
from detectron2.modeling.roi_heads import fast_rcnn as d2_fast_rcnn
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from detectron2.config import get_cfg

from conftest import get_config, tiny_batch
from libraghm import add_libraghm_config
from libraghm.losses import BoxRegLossType, balanced_l1_loss
from libraghm.losses import box_regression as lg_box_regression

ALPHA, GAMMA = 0.5, 1.5
B = math.exp(GAMMA / ALPHA) - 1.0  # alpha * ln(b + 1) = gamma


# -------------------------------------------------------------------------------------------------
# Independent closed forms (plain Python math), written from the paper / RESEARCH.md section 3.
# -------------------------------------------------------------------------------------------------
def paper_L(x):
    """Paper's form at beta = 1."""
    if x < 1:
        return ALPHA / B * (B * x + 1) * math.log(B * x + 1) - ALPHA * x
    return GAMMA * x + (GAMMA / B - ALPHA)


def paper_dL(x):
    return ALPHA * math.log(B * x + 1) if x < 1 else GAMMA


def mmdet_L(x, beta):
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


def test_mmdet_compat_reproduces_research_numbers():
    """RESEARCH.md section 3: at beta = 0.11 gradient 4.04 at 0, jump 1.70 -> 1.50 at beta."""
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
    with pytest.raises(ValueError, match="reduction"):
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
        ({"alpha": 0.0}, "alpha"),
        ({"gamma": -1.0}, "gamma"),
        ({"beta": 0.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"alpha": 0.01, "gamma": 1.5}, "gamma / alpha"),
        ({"mmdet_compat": 1}, "mmdet_compat"),
    ],
)
def test_function_rejects_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        balanced_l1_loss(torch.zeros(2), torch.zeros(2), **kw)


# -------------------------------------------------------------------------------------------------
# The dispatcher
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


def test_dispatcher_installed_in_detectron2_modules():
    for mod in (d2_box_regression, d2_fast_rcnn, d2_rpn, d2_retinanet):
        assert mod._dense_box_regression_loss is lg_box_regression.dense_box_regression_loss
    orig = lg_box_regression.D2_DENSE_BOX_REGRESSION_LOSS
    assert orig is not lg_box_regression.dense_box_regression_loss
    assert orig.__module__ == "detectron2.modeling.box_regression"
    # installing twice changes nothing
    fc = FastRCNNOutputLayers.from_config
    lg_box_regression.install()
    assert FastRCNNOutputLayers.from_config.__func__._libraghm_original is fc.__func__._libraghm_original


@pytest.mark.parametrize(
    "loss_type,beta", [("smooth_l1", 0.0), ("smooth_l1", 0.1), ("giou", 0.0), ("diou", 0.0), ("ciou", 0.0)]
)
def test_stock_types_bit_identical_through_dispatcher(loss_type, beta):
    b2b = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    results = []
    for fn in (lg_box_regression.D2_DENSE_BOX_REGRESSION_LOSS, d2_fast_rcnn._dense_box_regression_loss):
        anchors, preds, gt, fg = _dense_inputs()
        loss = fn(anchors, b2b, preds, gt, fg, box_reg_loss_type=loss_type, smooth_l1_beta=beta)
        grads = torch.autograd.grad(loss, preds)
        results.append((loss, grads))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


_NO_LIBRAGHM_SCRIPT = r"""
import sys, torch
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
data = torch.load(sys.argv[1])
b2b = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
out = {}
for key, (loss_type, beta) in data["cases"].items():
    preds = [p.clone().requires_grad_(True) for p in data["preds"]]
    loss = _dense_box_regression_loss(data["anchors"], b2b, preds, data["gt"], data["fg"],
                                      box_reg_loss_type=loss_type, smooth_l1_beta=beta)
    out[key] = (loss.detach(), [g for g in torch.autograd.grad(loss, preds)])
assert "libraghm" not in sys.modules
torch.save(out, sys.argv[2])
"""


def test_stock_types_bit_identical_with_and_without_libraghm(tmp_path):
    """A fresh process that never imports libraghm computes the same bits as we do here."""
    anchors, preds, gt, fg = _dense_inputs(requires_grad=False)
    cases = {"sl1_0": ("smooth_l1", 0.0), "sl1_011": ("smooth_l1", 0.11), "giou": ("giou", 0.0)}
    inp, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(
        {"anchors": [a.tensor for a in anchors], "preds": preds, "gt": gt, "fg": fg, "cases": cases},
        inp,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-c", _NO_LIBRAGHM_SCRIPT, str(inp), str(out)],
        check=True, cwd=str(tmp_path), env=env, timeout=120,
    )
    theirs = torch.load(out)
    b2b = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    for key, (loss_type, beta) in cases.items():
        ps = [p.clone().requires_grad_(True) for p in preds]
        # through the installed dispatcher, as the stock heads call it
        loss = d2_rpn._dense_box_regression_loss(
            [a.tensor for a in anchors], b2b, ps, gt, fg, box_reg_loss_type=loss_type, smooth_l1_beta=beta
        )
        grads = torch.autograd.grad(loss, ps)
        assert torch.equal(loss.detach(), theirs[key][0]), key
        for a, b in zip(grads, theirs[key][1]):
            assert torch.equal(a, b), key


def test_dispatcher_balanced_l1_is_sum_over_foreground_deltas():
    b2b = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    anchors, preds, gt, fg = _dense_inputs()
    all_anchors = torch.cat([a.tensor for a in anchors])
    target = torch.stack([b2b.get_deltas(all_anchors, g) for g in gt])[fg]
    pred = torch.cat(preds, dim=1)[fg]
    for loss_type, kw in [
        ("balanced_l1", {}),  # plain name: the paper's defaults
        (BoxRegLossType("balanced_l1", beta=0.11), {"beta": 0.11}),
        (BoxRegLossType("balanced_l1", beta=0.11, mmdet_compat=True), {"beta": 0.11, "mmdet_compat": True}),
    ]:
        got = d2_retinanet._dense_box_regression_loss(
            anchors, b2b, preds, gt, fg, box_reg_loss_type=loss_type, smooth_l1_beta=0.5
        )
        want = balanced_l1_loss(pred, target, reduction="sum", **kw)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    # Ellipsis mask (how FastRCNNOutputLayers.box_reg_loss calls it) = all boxes
    got = d2_fast_rcnn._dense_box_regression_loss(
        [all_anchors], b2b, [torch.cat(preds, 1)[:1]], gt[:1], ..., "balanced_l1", 0.0
    )
    want = balanced_l1_loss(torch.cat(preds, 1)[0], b2b.get_deltas(all_anchors, gt[0]), reduction="sum")
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_elementwise_helper_uses_carried_params():
    p, t = torch.randn(5, 4), torch.randn(5, 4)
    got = lg_box_regression.box_reg_loss_elementwise(BoxRegLossType("balanced_l1", beta=0.11), p, t)
    assert got.shape == (5, 4)
    assert torch.equal(got, balanced_l1_loss(p, t, beta=0.11))
    plain = lg_box_regression.box_reg_loss_elementwise("balanced_l1", p, t)
    assert torch.equal(plain, balanced_l1_loss(p, t))
    with pytest.raises(ValueError, match="not a LibraGHM box-regression loss type"):
        lg_box_regression.box_reg_loss_elementwise("smooth_l1", p, t)


def test_dispatcher_no_positives_gives_finite_zero():
    b2b = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    anchors, preds, gt, fg = _dense_inputs()
    loss = d2_rpn._dense_box_regression_loss(
        anchors, b2b, preds, gt, torch.zeros_like(fg), box_reg_loss_type="balanced_l1"
    )
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in preds)


def test_dispatcher_unknown_type_raises_clear_error():
    b2b = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    anchors, preds, gt, fg = _dense_inputs()
    with pytest.raises(ValueError, match=r"'balanced_L1'.*'smooth_l1'.*'balanced_l1'"):
        d2_fast_rcnn._dense_box_regression_loss(
            anchors, b2b, preds, gt, fg, box_reg_loss_type="balanced_L1"
        )


def test_box_reg_loss_type_is_a_str():
    t = BoxRegLossType("balanced_l1", {"beta": 0.11})
    assert t == "balanced_l1" and isinstance(t, str) and dict(t.params) == {"beta": 0.11}
    import copy
    import pickle

    for c in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        assert c == t and dict(c.params) == {"beta": 0.11}


# -------------------------------------------------------------------------------------------------
# Build hook and config validation
# -------------------------------------------------------------------------------------------------
def _predictor(cfg):
    return FastRCNNOutputLayers(cfg, ShapeSpec(channels=8))


def _bl1_cfg(**bl1):
    cfg = get_cfg()
    add_libraghm_config(cfg)
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "balanced_l1"
    for k, v in bl1.items():
        setattr(cfg.LIBRAGHM.BALANCED_L1, k, v)
    return cfg


def test_config_defaults():
    cfg = get_cfg()
    add_libraghm_config(cfg)
    c = cfg.LIBRAGHM.BALANCED_L1
    assert (c.ALPHA, c.GAMMA, c.BETA, c.MMDET_COMPAT) == (0.5, 1.5, 1.0, False)


def test_build_hook_attaches_validated_params():
    p = _predictor(_bl1_cfg(BETA=0.11, MMDET_COMPAT=True))
    assert isinstance(p.box_reg_loss_type, BoxRegLossType)
    assert dict(p.box_reg_loss_type.params) == {
        "alpha": 0.5, "gamma": 1.5, "beta": 0.11, "mmdet_compat": True
    }
    # stock types stay plain strings
    cfg = get_cfg()
    add_libraghm_config(cfg)
    assert type(_predictor(cfg).box_reg_loss_type) is str
    # explicit construction with a plain name works (defaults at loss time)
    q = FastRCNNOutputLayers(
        ShapeSpec(channels=8), box2box_transform=Box2BoxTransform((1.0, 1.0, 1.0, 1.0)),
        num_classes=3, box_reg_loss_type="balanced_l1",
    )
    assert q.box_reg_loss_type == "balanced_l1"


@pytest.mark.parametrize(
    "key,value", [("ALPHA", 0.0), ("ALPHA", -0.5), ("GAMMA", 0.0), ("GAMMA", float("inf")),
                  ("BETA", 0.0), ("BETA", -1.0), ("BETA", float("nan"))]
)
def test_bad_values_fail_at_build_time_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"LIBRAGHM\.BALANCED_L1\.{key} = .*> 0"):
        _predictor(_bl1_cfg(**{key: value}))


def test_bad_ratio_fails_at_build_time():
    with pytest.raises(ValueError, match=r"LIBRAGHM\.BALANCED_L1\.GAMMA / LIBRAGHM\.BALANCED_L1\.ALPHA"):
        _predictor(_bl1_cfg(ALPHA=0.01, GAMMA=1.5))


def test_missing_libraghm_config_is_a_clear_error():
    cfg = get_cfg()
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "balanced_l1"
    with pytest.raises(ValueError, match="add_libraghm_config"):
        _predictor(cfg)


@pytest.mark.parametrize(
    "rel,opts,key",
    [
        ("Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
         ["MODEL.RPN.BBOX_REG_LOSS_TYPE", "balanced_l1", "LIBRAGHM.BALANCED_L1.BETA", -0.1],
         r"LIBRAGHM\.BALANCED_L1\.BETA = -0\.1"),
        ("Shapes-Detection/retinanet_balanced_l1.yaml", ["LIBRAGHM.BALANCED_L1.ALPHA", 0.0],
         r"LIBRAGHM\.BALANCED_L1\.ALPHA = 0\.0"),
        ("Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
         ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "balancedl1"],
         r"MODEL\.ROI_BOX_HEAD\.BBOX_REG_LOSS_TYPE = 'balancedl1'.*'balanced_l1'"),
        ("Shapes-Detection/retinanet_small_R_FPN.yaml",
         ["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "l2"],
         r"MODEL\.RETINANET\.BBOX_REG_LOSS_TYPE = 'l2'.*'giou'"),
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
        assert cfg.LIBRAGHM.BALANCED_L1.BETA == beta and not cfg.LIBRAGHM.BALANCED_L1.MMDET_COMPAT


# -------------------------------------------------------------------------------------------------
# Real models: normalisation, training steps, bit-identical stock losses
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


def test_faster_rcnn_roi_and_rpn_balanced_l1_train_steps():
    cfg = get_config(
        "Shapes-Detection/faster_rcnn_balanced_l1.yaml", "MODEL.RPN.BBOX_REG_LOSS_TYPE", "balanced_l1"
    )
    model = build_model(cfg)
    for mod in (model.roi_heads.box_predictor, model.proposal_generator):
        assert isinstance(mod.box_reg_loss_type, BoxRegLossType)
        assert mod.box_reg_loss_type.params["beta"] == 1.0
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = tiny_batch(2)
    for step in range(2):
        losses = _train_step(model, batch, seed=step)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        assert losses["loss_box_reg"] > 0 and losses["loss_rpn_loc"] > 0
        g = model.roi_heads.box_predictor.bbox_pred.weight.grad
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        opt.step()


def test_faster_rcnn_no_gt_images_finite():
    cfg = get_config(
        "Shapes-Detection/faster_rcnn_balanced_l1.yaml", "MODEL.RPN.BBOX_REG_LOSS_TYPE", "balanced_l1"
    )
    model = build_model(cfg)
    losses = _train_step(model, tiny_batch(2, with_gt=(False, False)))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_rpn_loc"].item() == 0.0


def test_retinanet_balanced_l1_train_steps():
    cfg = get_config("Shapes-Detection/retinanet_balanced_l1.yaml")
    model = build_model(cfg)
    assert dict(model.box_reg_loss_type.params)["beta"] == 0.11
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    batch = tiny_batch(2)
    for step in range(2):
        losses = _train_step(model, batch, seed=step)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        assert losses["loss_box_reg"] > 0
        opt.step()
    losses = _train_step(model, tiny_batch(2, with_gt=(False, False)))
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box_reg"].item() == 0.0


def _set_type(module, loss_type, beta=0.0):
    module.box_reg_loss_type = loss_type
    if hasattr(module, "smooth_l1_beta"):
        module.smooth_l1_beta = beta


def _manual_sums(anchors_tensor, b2b, pred, gt, fg, bl1_kw):
    target = torch.stack([b2b.get_deltas(anchors_tensor, g) for g in gt])[fg]
    p = pred[fg]
    return balanced_l1_loss(p, target, reduction="sum", **bl1_kw), (p - target).abs().sum()


def test_normalisation_matches_detectron2_for_each_head():
    """loss(balanced_l1) / loss(L1) == sum(balanced_l1) / sum(L1): same normaliser, per head."""
    bl1 = BoxRegLossType("balanced_l1", beta=0.11)
    g = torch.Generator().manual_seed(3)

    # ROI box head: box_reg_loss(proposal_boxes, gt_boxes, pred_deltas, gt_classes)
    head = FastRCNNOutputLayers(
        ShapeSpec(channels=8), box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), num_classes=3
    )
    anchors, _, gt, fg = _dense_inputs(seed=1, num_images=1)
    props = torch.cat([a.tensor for a in anchors])
    gt_classes = torch.where(fg[0], torch.randint(0, 3, (props.shape[0],), generator=g), torch.tensor(3))
    deltas = torch.randn(props.shape[0], 12, generator=g)
    out = {}
    for name, t in (("l1", "smooth_l1"), ("bl1", bl1)):
        _set_type(head, t)
        out[name] = head.box_reg_loss(props, gt[0], deltas, gt_classes)
    fg_pred = deltas.view(-1, 3, 4)[fg[0], gt_classes[fg[0]]]
    target = head.box2box_transform.get_deltas(props[fg[0]], gt[0][fg[0]])
    s_bl1 = balanced_l1_loss(fg_pred, target, beta=0.11, reduction="sum")
    s_l1 = (fg_pred - target).abs().sum()
    ratio = out["bl1"] / out["l1"]
    assert ratio.item() == pytest.approx((s_bl1 / s_l1).item(), rel=1e-5)
    assert out["l1"].item() == pytest.approx(s_l1.item() / props.shape[0], rel=1e-5)

    # RPN and RetinaNet: their losses(...) methods on a real model's modules
    rcnn = build_model(get_config("Shapes-Detection/faster_rcnn_small_R_FPN.yaml"))
    retina = build_model(get_config("Shapes-Detection/retinanet_small_R_FPN.yaml"))
    anchors, preds, gt, fg = _dense_inputs(seed=2)
    labels = [torch.where(f, 1, 0) for f in fg]
    N, R = fg.shape
    for module, key, make_logits, make_labels in [
        (rcnn.proposal_generator, "loss_rpn_loc",
         lambda: [torch.zeros(N, a.tensor.shape[0]) for a in anchors], lambda: labels),
        (retina, "loss_box_reg",
         lambda: [torch.zeros(N, a.tensor.shape[0], 5) for a in anchors],
         lambda: [torch.where(f, 2, 5) for f in fg]),
    ]:
        vals = {}
        for t in ("smooth_l1", bl1):
            _set_type(module, t)
            if hasattr(module, "loss_normalizer"):
                del module.loss_normalizer  # RetinaNet's EMA normaliser starts afresh
            with EventStorage():
                losses = module.losses(anchors, make_logits(), make_labels(), preds, gt)
            vals[type(t)] = losses[key]
        s_bl1, s_l1 = _manual_sums(
            torch.cat([a.tensor for a in anchors]), module.box2box_transform,
            torch.cat(preds, 1), gt, fg, {"beta": 0.11}
        )
        assert (vals[BoxRegLossType] / vals[str]).item() == pytest.approx((s_bl1 / s_l1).item(), rel=1e-5)


@pytest.mark.parametrize(
    "rel,opts",
    [
        ("Shapes-Detection/faster_rcnn_small_R_FPN.yaml", []),
        ("Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
         ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "giou", "MODEL.RPN.SMOOTH_L1_BETA", 0.111]),
        ("Shapes-Detection/retinanet_small_R_FPN.yaml", ["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "giou"]),
    ],
)
def test_stock_model_losses_bit_identical_to_undispatched(rel, opts, monkeypatch):
    """A stock model's losses and gradients with the dispatcher == with Detectron2's function."""
    model = build_model(get_config(rel, *opts))
    batch = tiny_batch(2)

    def run():
        if hasattr(model, "loss_normalizer"):
            del model.loss_normalizer
        losses = _train_step(model, batch, seed=7)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return {k: v.detach() for k, v in losses.items()}, grads

    with_dispatcher = run()
    for mod in (d2_box_regression, d2_fast_rcnn, d2_rpn, d2_retinanet):
        monkeypatch.setattr(mod, "_dense_box_regression_loss", lg_box_regression.D2_DENSE_BOX_REGRESSION_LOSS)
    without = run()
    assert with_dispatcher[0].keys() == without[0].keys()
    for k in without[0]:
        assert torch.equal(with_dispatcher[0][k], without[0][k]), k
    assert len(with_dispatcher[1]) == len(without[1])
    for a, b in zip(with_dispatcher[1], without[1]):
        assert torch.equal(a, b)


def test_two_models_keep_their_own_parameters():
    a = build_model(get_config("Shapes-Detection/retinanet_balanced_l1.yaml"))
    b = build_model(get_config("Shapes-Detection/retinanet_balanced_l1.yaml",
                               "LIBRAGHM.BALANCED_L1.BETA", 1.0, "LIBRAGHM.BALANCED_L1.MMDET_COMPAT", True))
    assert a.box_reg_loss_type.params["beta"] == 0.11 and not a.box_reg_loss_type.params["mmdet_compat"]
    assert b.box_reg_loss_type.params["beta"] == 1.0 and b.box_reg_loss_type.params["mmdet_compat"]


_COMPOSE_CASES = [
    # (base config, opts, registry kind, registered name the case needs)
    ("Shapes-Detection/faster_rcnn_balanced_l1.yaml",
     ["MODEL.ROI_HEADS.NAME", "LibraROIHeads", "MODEL.PROPOSAL_GENERATOR.NAME", "LibraRPN",
      "LIBRAGHM.ROI_SAMPLER.NAME", "IoUBalancedSampler", "MODEL.RPN.BBOX_REG_LOSS_TYPE", "balanced_l1"],
     "roi", "LibraROIHeads"),
    ("Shapes-Detection/faster_rcnn_balanced_l1.yaml",
     ["MODEL.PROPOSAL_GENERATOR.NAME", "GHMRPN", "MODEL.RPN.BBOX_REG_LOSS_TYPE", "balanced_l1"],
     "rpn", "GHMRPN"),
    ("Shapes-Detection/faster_rcnn_balanced_l1.yaml",
     ["MODEL.ROI_HEADS.NAME", "OHEMROIHeads", "LIBRAGHM.OHEM.MODE", "mmdet"], "roi", "OHEMROIHeads"),
    ("Shapes-Detection/retinanet_balanced_l1.yaml",
     ["MODEL.META_ARCHITECTURE", "GHMRetinaNet", "LIBRAGHM.GHM_RETINANET.CLS_LOSS_TYPE", "ghm_c",
      "LIBRAGHM.GHM_RETINANET.BOX_LOSS_TYPE", "detectron2"], "arch", "GHMRetinaNet"),
]


@pytest.mark.parametrize("rel,opts,kind,name", _COMPOSE_CASES, ids=[c[3] for c in _COMPOSE_CASES])
def test_composes_with_libraghm_subclasses(rel, opts, kind, name):
    """LibraGHM's own RPN / ROI-heads / RetinaNet subclasses train with balanced_l1 too."""
    from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY

    reg = {"roi": ROI_HEADS_REGISTRY, "rpn": PROPOSAL_GENERATOR_REGISTRY, "arch": META_ARCH_REGISTRY}[kind]
    if name not in reg:
        pytest.skip(f"{name} is not registered in this checkout")
    model = build_model(get_config(rel, *opts))
    heads = [model] if kind == "arch" else [model.roi_heads.box_predictor]
    if "MODEL.RPN.BBOX_REG_LOSS_TYPE" in opts:
        heads.append(model.proposal_generator)
    for h in heads:
        assert isinstance(h.box_reg_loss_type, BoxRegLossType)
    # Count calls of the balanced L1 entry to prove it is what computed the box loss.
    entry = lg_box_regression.BOX_REG_LOSS_REGISTRY["balanced_l1"]
    calls = []
    orig = entry.loss_fn

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    entry.loss_fn = counting
    try:
        losses = _train_step(model, tiny_batch(2))
    finally:
        entry.loss_fn = orig
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert len(calls) >= len(heads)
