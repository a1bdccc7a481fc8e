"""Tests of EfficientDet as a whole model (libraghm/modeling/efficientdet*.py, losses/huber_loss.py):
parameter counts against the paper, the head's shared convs and per-level BN, the compound-scaling
presets and the rule by which they meet explicit keys, every loss training a step, the loss going down,
the Huber loss against its closed form, checkpoints and the shipped configs. Export (TorchScript, ONNX):
tests/test_efficientdet_export.py.
"""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils.events import EventStorage
from fvcore.nn import smooth_l1_loss

import train_net
from conftest import CONFIGS, get_config, spec_message, tiny_batch
from libraghm import add_libraghm_config, model_zoo
from libraghm.losses import BOX_REG_LOSS_REGISTRY, CLASSIFICATION_LOSS_REGISTRY, HuberLoss
from libraghm.modeling import EfficientDet, EfficientDetHead, apply_efficientdet_preset
from libraghm.modeling.efficientdet_presets import (
    DATA_KEYS,
    EFFICIENTDET_PRESETS,
    GOVERNED_KEYS,
    preset_values,
)
from libraghm.validation import cfg_node

SHAPES = "Shapes-Detection/efficientdet_lite0.yaml"
BASELINE = "Shapes-Detection/retinanet_lite0_FPN.yaml"
COCO = ["COCO-Detection/efficientdet_d0.yaml"] + [
    f"COCO-Detection/efficientdet_lite{i}.yaml" for i in range(3)]


def _cfg(preset="Lite0", *opts, num_classes=5, apply=True):
    """An EfficientDet config with ``preset`` applied (as setup does), random weights, then ``opts``."""
    cfg = add_libraghm_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "EfficientDet"
    cfg.MODEL.EFFICIENTDET.PRESET = preset
    cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.DEVICE = "cpu"
    if apply:
        apply_efficientdet_preset(cfg)
    cfg.merge_from_list(list(opts))
    return cfg


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _step(model, batch, storage_iter=0):
    model.train()
    with EventStorage(storage_iter):
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    return losses


# ------------------------------------------------------------------------------------------------
# Size: the paper's parameter counts, the head by hand
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,published", [("D0", 3.9e6), ("D1", 6.6e6), ("D2", 8.1e6)])
def test_parameter_count_matches_the_paper(preset, published):
    """Table 2 of the paper (90 COCO class ids): 3.9M, 6.6M, 8.1M, within 2 %. Trainable backbone BN
    (the COCO recipe's): frozen BN keeps its affine in buffers, which are not parameters."""
    model = build_model(_cfg(preset, "MODEL.EFFICIENTNET.NORM", "BN", "MODEL.EFFICIENTNET.FREEZE_AT", 0,
                             num_classes=90))
    assert abs(_count(model) / published - 1) < 0.02, _count(model)


def test_head_parameters_by_hand():
    head = build_model(_cfg("D0", num_classes=90)).head
    W, R, L, A, K = 64, 3, 5, 9, 90

    def sep(c_in, c_out):  # depthwise 3x3 (no bias) + pointwise 1x1 with bias
        return 9 * c_in + c_in * c_out + c_out

    def net(outputs):  # shared convs, a BN (weight + bias) per level and conv, shared predictor
        return R * sep(W, W) + L * R * 2 * W + sep(W, outputs)

    assert _count(head.class_net) == net(A * K)
    assert _count(head.box_net) == net(A * 4)
    assert _count(head) == net(A * K) + net(A * 4) == 88398


# ------------------------------------------------------------------------------------------------
# The head: convs shared across levels, BN per level
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_head():
    return build_model(_cfg("Lite0")).head


def _levels(seed=0, n=2, width=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, 2 ** (5 - i), 2 ** (5 - i) + 1, generator=g) for i in range(5)]


def test_head_structure_shares_convs_and_keeps_a_bn_per_level(lite0_head):
    for net in (lite0_head.class_net, lite0_head.box_net):
        assert len(net.convs) == 3 and len(net.norms) == 5 and all(len(n) == 3 for n in net.norms)
        bns = [bn for level in net.norms for bn in level]
        assert len({id(bn) for bn in bns}) == 15  # 5 levels x 3 convs, all distinct
        assert all(type(bn) is torch.nn.BatchNorm2d for bn in bns)
        assert all(bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3) for bn in bns)
        assert isinstance(net.activation, torch.nn.ReLU6)  # Lite
        for conv in list(net.convs) + [net.predictor]:
            assert conv.depthwise.groups == 64 and conv.depthwise.kernel_size == (3, 3)
            assert conv.depthwise.bias is None and conv.pointwise.bias is not None
        # one conv module per repeat, whatever the number of levels
        assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 2 * (3 + 1)
    prior = -math.log(0.99 / 0.01)
    torch.testing.assert_close(lite0_head.class_net.predictor.pointwise.bias,
                               torch.full((9 * 5,), prior))
    assert lite0_head.box_net.predictor.pointwise.bias.abs().max() == 0


def test_forward_changes_only_the_bn_statistics_of_the_level_whose_input_changed(lite0_head):
    a, b = copy.deepcopy(lite0_head).train(), copy.deepcopy(lite0_head).train()
    xa = _levels()
    xb = [x.clone() for x in xa]
    xb[2] = xb[2] * 3 + 1  # only P5 differs
    with torch.no_grad():
        out_a, out_b = a(xa), b(xb)
    for net_a, net_b in ((a.class_net, b.class_net), (a.box_net, b.box_net)):
        for level in range(5):
            same = [torch.equal(p.running_mean, q.running_mean) and torch.equal(p.running_var, q.running_var)
                    for p, q in zip(net_a.norms[level], net_b.norms[level])]
            assert all(same) if level != 2 else not any(same), level
        for p, q in zip(net_a.parameters(), net_b.parameters()):
            assert torch.equal(p, q)  # the shared convs are untouched by a forward
    for level in range(5):  # the other levels' outputs are unchanged too
        assert torch.equal(out_a[0][level], out_b[0][level]) == (level != 2)


def test_each_level_uses_the_shared_convs_and_its_own_bn(lite0_head):
    head = copy.deepcopy(lite0_head).eval()
    g = torch.Generator().manual_seed(1)
    for bn in head.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(64, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(64, generator=g) + 0.5)
    xs = _levels(2)
    with torch.no_grad():
        logits, deltas = head(xs)
        for net, got in ((head.class_net, logits), (head.box_net, deltas)):
            for level, x in enumerate(xs):
                for conv, bn in zip(net.convs, net.norms[level]):
                    x = F.conv2d(x, conv.depthwise.weight, None, 1, 1, 1, 64)
                    x = F.conv2d(x, conv.pointwise.weight, conv.pointwise.bias)
                    x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                                     0.0, bn.eps).clamp(0, 6)
                x = F.conv2d(x, net.predictor.depthwise.weight, None, 1, 1, 1, 64)
                x = F.conv2d(x, net.predictor.pointwise.weight, net.predictor.pointwise.bias)
                torch.testing.assert_close(got[level], x)
    assert [t.shape[1] for t in logits] == [45] * 5 and [t.shape[1] for t in deltas] == [36] * 5


def test_head_needs_one_width():
    from detectron2.layers import ShapeSpec

    with pytest.raises(ValueError, match=r"same channels; got \[64, 64, 32\]"):
        EfficientDetHead(input_shape=[ShapeSpec(channels=c) for c in (64, 64, 32)], num_classes=3,
                         num_anchors=9)


@pytest.mark.parametrize("arg,value", [("box_class_repeats", 0), ("box_class_repeats", 2.0),
                                       ("activation", "swish"), ("norm", "GN"),
                                       ("bn_momentum", 1.5), ("bn_eps", 0.0)])
def test_bad_head_keys_fail_at_build_naming_the_key(arg, value):
    cfg = get_config(SHAPES, "MODEL.EFFICIENTNET.PRETRAINED", False)
    key = f"MODEL.EFFICIENTDET.{arg.upper()}"
    cfg_node(cfg, "MODEL.EFFICIENTDET")[arg.upper()] = value
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    assert str(err.value) == spec_message(key, EfficientDetHead.PARAMS[arg], value)


# ------------------------------------------------------------------------------------------------
# Presets and the rule
# ------------------------------------------------------------------------------------------------
# The paper's Table 1 and the Lite models: backbone, BiFPN width / repeats, head depth, input size,
# anchor scale, fusion, activation.
TABLE = {
    "D0": ("b0", 64, 3, 3, 512, 4.0, "fast", "silu"),
    "D1": ("b1", 88, 4, 3, 640, 4.0, "fast", "silu"),
    "D2": ("b2", 112, 5, 3, 768, 4.0, "fast", "silu"),
    "D3": ("b3", 160, 6, 4, 896, 4.0, "fast", "silu"),
    "D4": ("b4", 224, 7, 4, 1024, 4.0, "fast", "silu"),
    "D5": ("b5", 288, 7, 4, 1280, 4.0, "fast", "silu"),
    "D6": ("b6", 384, 8, 5, 1280, 4.0, "sum", "silu"),
    "D7": ("b6", 384, 8, 5, 1536, 5.0, "sum", "silu"),
    "Lite0": ("lite0", 64, 3, 3, 320, 3.0, "sum", "relu6"),
    "Lite1": ("lite1", 88, 4, 3, 384, 3.0, "sum", "relu6"),
    "Lite2": ("lite2", 112, 5, 3, 448, 3.0, "sum", "relu6"),
    "Lite3": ("lite3", 160, 6, 4, 512, 4.0, "sum", "relu6"),
    "Lite4": ("lite4", 224, 7, 4, 640, 4.0, "sum", "relu6"),
}


@pytest.mark.parametrize("preset", list(TABLE))
def test_applied_preset_writes_every_governed_key(preset):
    assert list(EFFICIENTDET_PRESETS) == list(TABLE)
    backbone, width, repeats, head, size, scale, fusion, act = TABLE[preset]
    cfg = _cfg(preset)
    values = preset_values(preset)
    assert set(values) == set(GOVERNED_KEYS)
    for key in GOVERNED_KEYS:
        got = cfg_node(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == (
            list(values[key]) if isinstance(values[key], tuple) else values[key]), key
    m = cfg.MODEL
    assert (m.EFFICIENTNET.NAME, m.BIFPN.WIDTH, m.BIFPN.REPEATS, m.EFFICIENTDET.BOX_CLASS_REPEATS,
            m.BIFPN.FUSION, m.BIFPN.ACTIVATION, m.EFFICIENTDET.ACTIVATION) == (
        backbone, width, repeats, head, fusion, act, act)
    assert list(cfg.INPUT.MIN_SIZE_TRAIN) == [size] and cfg.INPUT.MAX_SIZE_TRAIN == size
    assert cfg.INPUT.MIN_SIZE_TEST == size == cfg.INPUT.MAX_SIZE_TEST
    assert m.BACKBONE.NAME == "build_bifpn_backbone"
    assert m.BIFPN.BOTTOM_UP == "build_efficientnet_backbone" and m.BIFPN.TOP_LEVEL == 7
    assert m.RETINANET.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"]
    sizes = m.ANCHOR_GENERATOR.SIZES
    for lv, level_sizes in zip(range(3, 8), sizes):  # anchor_scale * stride * 2^(k/3), k = 0, 1, 2
        assert level_sizes == pytest.approx([scale * 2**lv * 2 ** (k / 3) for k in range(3)])
    assert m.ANCHOR_GENERATOR.ASPECT_RATIOS == [[0.5, 1.0, 2.0]]
    assert (m.RETINANET.FOCAL_LOSS_ALPHA, m.RETINANET.FOCAL_LOSS_GAMMA) == (0.25, 1.5)
    assert (m.RETINANET.BBOX_REG_LOSS_TYPE, m.HUBER.DELTA, m.HUBER.LOSS_WEIGHT) == ("huber", 0.1, 12.5)
    mean = [127.5] * 3 if preset.startswith("Lite") else pytest.approx([123.675, 116.28, 103.53])
    assert m.PIXEL_MEAN == mean and cfg.INPUT.FORMAT == "RGB"


def test_preset_is_idempotent_and_empty_preset_touches_nothing():
    cfg = _cfg("D1")
    again = apply_efficientdet_preset(cfg.clone())
    assert again == cfg
    plain = _cfg("", apply=False)
    before = plain.clone()
    assert apply_efficientdet_preset(plain) == before


def test_overrides_keep_their_values_and_the_model_builds():
    """The documented way to change a governed key under a preset: list it in OVERRIDES."""
    cfg = _cfg("", apply=False)
    cfg.MODEL.EFFICIENTDET.PRESET = "Lite0"
    cfg.MODEL.EFFICIENTDET.OVERRIDES = ["INPUT.MIN_SIZE_TEST", "MODEL.BIFPN.WIDTH"]
    cfg.INPUT.MIN_SIZE_TEST = 256
    cfg.MODEL.BIFPN.WIDTH = 48
    apply_efficientdet_preset(cfg)
    assert cfg.INPUT.MIN_SIZE_TEST == 256 and cfg.MODEL.BIFPN.WIDTH == 48
    assert cfg.INPUT.MAX_SIZE_TEST == 320 and cfg.MODEL.BIFPN.REPEATS == 3  # the others: Lite0's
    model = build_model(cfg)
    assert model.preset == "Lite0" and model.backbone.output_shape()["p3"].channels == 48
    assert model.head.class_net.convs[0].pointwise.weight.shape[0] == 48


def test_explicit_value_that_conflicts_with_the_preset_fails_naming_the_fix():
    cfg = _cfg("", apply=False)
    cfg.MODEL.EFFICIENTDET.PRESET = "D0"
    cfg.MODEL.BIFPN.WIDTH = 128  # neither the default (64) nor D0's (64)
    with pytest.raises(ValueError) as err:
        apply_efficientdet_preset(cfg)
    msg = str(err.value)
    assert msg.startswith("MODEL.BIFPN.WIDTH = 128 conflicts with MODEL.EFFICIENTDET.PRESET = 'D0', "
                          "which sets it to 64: ")
    assert "MODEL.EFFICIENTDET.OVERRIDES" in msg and "preset ''" in msg


def test_explicit_value_equal_to_the_default_is_replaced_as_documented():
    cfg = _cfg("", apply=False)
    cfg.MODEL.EFFICIENTDET.PRESET = "D2"
    cfg.MODEL.BIFPN.WIDTH = 64  # the default: cannot be told from an unset key
    apply_efficientdet_preset(cfg)
    assert cfg.MODEL.BIFPN.WIDTH == 112


def test_setup_applies_the_preset_after_the_file_and_the_command_line(tmp_path):
    yaml = tmp_path / "edet.yaml"
    yaml.write_text(
        f'_BASE_: "{os.path.join(CONFIGS, "COCO-Detection/efficientdet_lite0.yaml")}"\n'
        "MODEL:\n  EFFICIENTDET:\n    OVERRIDES: ['INPUT.MIN_SIZE_TRAIN', 'INPUT.MAX_SIZE_TRAIN']\n"
        "INPUT:\n  MIN_SIZE_TRAIN: (256, 288)\n")
    data = ["DATASETS.TRAIN", "('shapes_train_mini',)", "DATASETS.TEST", "()"]
    args = default_argument_parser().parse_args([
        "--config-file", str(yaml), "OUTPUT_DIR", str(tmp_path / "out"), *data,
        "INPUT.MAX_SIZE_TRAIN", "400", "MODEL.EFFICIENTDET.PRESET", "Lite1"])
    cfg = train_net.setup(args)
    assert cfg.MODEL.EFFICIENTNET.NAME == "lite1" and cfg.MODEL.BIFPN.WIDTH == 88
    assert list(cfg.INPUT.MIN_SIZE_TRAIN) == [256, 288] and cfg.INPUT.MAX_SIZE_TRAIN == 400
    assert cfg.INPUT.MIN_SIZE_TEST == 384  # not overridden: Lite1's
    conflict = default_argument_parser().parse_args([
        "--config-file", str(yaml), "OUTPUT_DIR", str(tmp_path / "out2"), *data,
        "MODEL.BIFPN.REPEATS", "2"])
    with pytest.raises(ValueError, match=r"MODEL\.BIFPN\.REPEATS = 2 conflicts with "
                                         r"MODEL\.EFFICIENTDET\.PRESET = 'Lite0'"):
        train_net.setup(conflict)


def test_preset_not_applied_fails_at_build_naming_the_key():
    with pytest.raises(ValueError) as err:
        build_model(_cfg("D0", apply=False))
    assert str(err.value).startswith(
        "MODEL.EFFICIENTDET.PRESET = 'D0' is set but MODEL.BACKBONE.NAME = 'build_resnet_backbone' is "
        "not the preset's value 'build_bifpn_backbone': the preset was not applied.")
    assert "apply_efficientdet_preset(cfg)" in str(err.value)
    changed = _cfg("Lite0", "MODEL.RETINANET.FOCAL_LOSS_GAMMA", 2.0)  # changed after applying
    with pytest.raises(ValueError, match=r"MODEL\.RETINANET\.FOCAL_LOSS_GAMMA = 2\.0 is not the "
                                         r"preset's value 1\.5"):
        build_model(changed)
    # the input sizes are the data's: not checked by the model (tests shrink them)
    assert set(DATA_KEYS) == {k for k in GOVERNED_KEYS if k.startswith("INPUT.") and "SIZE" in k}
    build_model(_cfg("Lite0", "INPUT.MIN_SIZE_TEST", 128))


@pytest.mark.parametrize("name", ["D8", "d0", "lite0", "Lite5", " D0", 0, None])
def test_bad_preset_fails_naming_the_valid_ones(name):
    valid = ", ".join(repr(n) for n in TABLE)
    msg = f"MODEL.EFFICIENTDET.PRESET = {name!r} is invalid: expected '' (no preset) or one of {valid}."
    cfg = _cfg("", apply=False)
    cfg.MODEL.EFFICIENTDET.PRESET = name
    with pytest.raises(ValueError) as err:
        apply_efficientdet_preset(cfg)
    assert str(err.value) == msg
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    assert str(err.value) == msg


def test_bad_overrides_and_wrong_meta_architecture_fail():
    cfg = _cfg("", apply=False)
    cfg.MODEL.EFFICIENTDET.PRESET = "D0"
    cfg.MODEL.EFFICIENTDET.OVERRIDES = ["MODEL.BIFPN.NORM"]  # not a governed key
    with pytest.raises(ValueError, match=r"OVERRIDES = \['MODEL.BIFPN.NORM'\] is invalid: expected a "
                                         r"list of keys a preset governs, among MODEL.BACKBONE.NAME"):
        apply_efficientdet_preset(cfg)
    cfg = _cfg("", apply=False)
    cfg.MODEL.EFFICIENTDET.OVERRIDES = ["MODEL.BIFPN.WIDTH"]
    with pytest.raises(ValueError, match=r"is invalid with MODEL.EFFICIENTDET.PRESET = ''"):
        build_model(cfg)
    cfg = _cfg("", apply=False)
    cfg.MODEL.EFFICIENTDET.PRESET = "Lite0"
    cfg.MODEL.META_ARCHITECTURE = "LibraGHMRetinaNet"
    with pytest.raises(ValueError, match=r"PRESET = 'Lite0' needs MODEL.META_ARCHITECTURE: "
                                         r"EfficientDet; this config has 'LibraGHMRetinaNet'"):
        apply_efficientdet_preset(cfg)


# ------------------------------------------------------------------------------------------------
# Training: every loss, the loss going down, Huber's closed form
# ------------------------------------------------------------------------------------------------
LOSS_CASES = [(c, "huber") for c in CLASSIFICATION_LOSS_REGISTRY.names() if c != "bce"] + [
    ("focal", b) for b in BOX_REG_LOSS_REGISTRY.names() if b != "huber"]


def test_loss_cases_cover_the_registries():
    assert {c for c, _ in LOSS_CASES} >= {"focal", "ghm_c"}
    assert {b for _, b in LOSS_CASES} == set(BOX_REG_LOSS_REGISTRY.names())


@pytest.mark.parametrize("cls_loss,box_loss", LOSS_CASES, ids=[f"{c}-{b}" for c, b in LOSS_CASES])
def test_lite0_trains_a_step_with_every_loss(cls_loss, box_loss):
    cfg = _cfg("Lite0", "MODEL.EFFICIENTDET.OVERRIDES",
               ["MODEL.RETINANET.CLS_LOSS_TYPE", "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"],
               "MODEL.RETINANET.CLS_LOSS_TYPE", cls_loss, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", box_loss)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, EfficientDet) and isinstance(model.head, EfficientDetHead)
    assert model.cls_loss.name == cls_loss and model.box_reg_loss.name == box_loss
    losses = _step(model, tiny_batch(2, 96, 128))
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.head.box_net.predictor.pointwise.weight.grad.abs().sum() > 0


def test_loss_goes_down_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(_cfg("Lite0"))
    batch = tiny_batch(2, 80, 112)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    history = []
    for it in range(20):
        opt.zero_grad()
        losses = _step(model, batch, it)
        history.append({k: float(v) for k, v in losses.items()})
        opt.step()
    totals = [sum(h.values()) for h in history]
    assert all(math.isfinite(t) for t in totals)
    assert sum(totals[-3:]) / 3 < 0.75 * totals[0], totals
    for key in ("loss_cls", "loss_box_reg"):  # both terms learn
        assert history[-1][key] < 0.9 * history[0][key], (key, history)


def test_huber_matches_its_closed_form():
    loss = HuberLoss(delta=0.1, loss_weight=12.5)
    pred = torch.tensor([[0.0, 0.05, -0.05, 0.1], [-0.1, 0.3, -2.0, 0.099]], requires_grad=True)
    target = torch.zeros(2, 4)
    d = pred.detach().abs()
    closed = torch.where(d <= 0.1, 0.5 * d**2, 0.1 * (d - 0.05)) * 12.5
    torch.testing.assert_close(loss.elementwise(pred, target), closed)
    # = 12.5 x 0.1 x smooth L1 with beta 0.1 (EfficientDet's 50 x huber / 4 coordinates)
    torch.testing.assert_close(loss.elementwise(pred, target),
                               1.25 * smooth_l1_loss(pred.detach(), target, 0.1, "none"))
    loss.elementwise(pred, target).sum().backward()
    slope = torch.where(d <= 0.1, pred.detach(), 0.1 * pred.detach().sign()) * 12.5
    torch.testing.assert_close(pred.grad, slope)
    # through the dense interface: summed over the foreground boxes only, per_box consistent
    b2b = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0], [0.0, 0.0, 4.0, 4.0]])
    gt = torch.tensor([[1.0, 0.0, 11.0, 12.0], [4.0, 6.0, 26.0, 15.0], [0.0, 0.0, 30.0, 30.0]])
    deltas = torch.tensor([[0.02, -0.3, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    fg = torch.tensor([[True, True, False]])
    dense = loss([anchors], b2b, [deltas[None]], [gt], fg)
    target = b2b.get_deltas(anchors[:2], gt[:2])
    d = (deltas[:2] - target).abs()
    expected = (torch.where(d <= 0.1, 0.5 * d**2, 0.1 * (d - 0.05)) * 12.5).sum()
    torch.testing.assert_close(dense, expected)
    torch.testing.assert_close(loss.per_box(anchors[:2], gt[:2], deltas[:2], b2b).sum(), expected)
    assert BOX_REG_LOSS_REGISTRY.get("huber") is HuberLoss and not HuberLoss.normalized


@pytest.mark.parametrize("key,value", [("DELTA", 0.0), ("DELTA", float("nan")), ("LOSS_WEIGHT", -1.0)])
def test_bad_huber_keys_fail_naming_the_key(key, value):
    cfg = get_config(SHAPES, "MODEL.EFFICIENTNET.PRETRAINED", False)
    cfg.MODEL.HUBER[key] = value
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    assert str(err.value) == spec_message(f"MODEL.HUBER.{key}", HuberLoss.PARAMS[key.lower()], value)


# ------------------------------------------------------------------------------------------------
# Checkpoints and the shipped configs
# ------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model(_cfg("Lite0", "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0))
    batch = tiny_batch(2, 96, 128)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for it in range(2):  # moves the weights, the per-level BN statistics and the loss normaliser
        opt.zero_grad()
        _step(model, batch, it)
        opt.step()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("edet")
    torch.manual_seed(1)
    fresh = build_model(_cfg("Lite0", "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0))
    assert not torch.equal(fresh.head.class_net.norms[4][0].running_var,
                           model.head.class_net.norms[4][0].running_var)
    DetectionCheckpointer(fresh).load(str(tmp_path / "edet.pth"))
    state, loaded = model.state_dict(), fresh.state_dict()
    assert list(state) == list(loaded) and all(torch.equal(state[k], loaded[k]) for k in state)
    images = [{"image": x["image"]} for x in batch]
    with torch.no_grad():
        a, b = model.eval()(images), fresh.eval()(images)
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert len(x) > 0 and len(x) == len(y)
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor) and torch.equal(x.scores, y.scores)
        assert torch.equal(x.pred_classes, y.pred_classes)


@pytest.mark.parametrize("path", COCO)
def test_coco_config_builds_and_steps(path):
    """Through model_zoo.get_config (preset applied); random weights, tiny images."""
    cfg = model_zoo.get_config(path)
    preset = cfg.MODEL.EFFICIENTDET.PRESET
    assert preset == ("D0" if "d0" in path else "Lite" + path[-6])
    size = TABLE[preset][4]
    assert list(cfg.INPUT.MIN_SIZE_TRAIN) == [size] and cfg.INPUT.MAX_SIZE_TEST == size
    s = cfg.SOLVER
    assert (s.LR_SCHEDULER_NAME, s.WEIGHT_DECAY, s.MOMENTUM, s.BASE_LR, s.IMS_PER_BATCH) == (
        "WarmupCosineLR", 4e-5, 0.9, 0.16, 128)
    assert cfg.LIBRAGHM.CLIP_GRAD_NORM == 10.0 and cfg.MODEL.RETINANET.NUM_CLASSES == 80
    assert cfg.MODEL.EFFICIENTNET.PRETRAINED == preset.startswith("Lite")
    cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert model.preset == preset and isinstance(model.head.class_net.norms[0][0], torch.nn.SyncBatchNorm)
    losses = _step(model, tiny_batch(2, 128, 160))
    assert all(torch.isfinite(v) for v in losses.values()), losses


def test_shapes_config_is_lite0_with_the_datasets_input_and_anchors():
    """The Shapes config writes Lite0's keys out (PRESET ''): exactly the documented ones differ."""
    cfg = get_config(SHAPES, tiny=False)
    assert cfg.MODEL.EFFICIENTDET.PRESET == "" and cfg.MODEL.EFFICIENTNET.PRETRAINED
    differ = sorted(k for k, v in preset_values("Lite0").items() if not _equal(cfg_node(cfg, k), v))
    assert differ == sorted(["MODEL.ANCHOR_GENERATOR.SIZES", *DATA_KEYS])
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[0] == [12, 15, 19]
    assert (cfg.MODEL.EFFICIENTNET.FREEZE_AT, cfg.MODEL.EFFICIENTNET.NORM) == (2, "FrozenBN")
    baseline = get_config(BASELINE, tiny=False)
    for key in ["MODEL.EFFICIENTNET", "MODEL.ANCHOR_GENERATOR.SIZES", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD",
                "INPUT", "SOLVER", "DATASETS", "MODEL.RETINANET.NUM_CLASSES"]:
        assert cfg_node(cfg, key) == cfg_node(baseline, key), key
    assert baseline.MODEL.FPN.OUT_CHANNELS == cfg.MODEL.BIFPN.WIDTH == 64
    assert baseline.MODEL.BACKBONE.NAME == "build_efficientnet_retinanet_fpn_backbone"
    assert cfg.SOLVER.IMS_PER_BATCH == 4


def _equal(a, b):
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return plain(a) == plain(b)
