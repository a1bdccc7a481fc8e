"""Tests of the BiFPN backbone (libraghm/backbone/bifpn.py): graph, fusion, resampling, shapes on odd
input sizes, parameter count, TorchScript / ONNX export, real Detectron2 training steps, bad configs.
"""

import io
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import cached_config, config_path, get_config, spec_message, tiny_batch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone import Backbone
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

from libraghm import add_libraghm_config
from libraghm.backbone.bifpn import (
    POOL_PADDINGS,
    BiFPN,
    BiFPNNeck,
    FastNormalizedFusion,
    Resample,
    SoftmaxFusion,
    SumFusion,
    bifpn_graph,
    bifpn_output_ids,
)
from libraghm.backbone.small_resnet import PARAMS as SMALL_RESNET_PARAMS
from libraghm.validation import Bool, Float, Int, OneOf, StrList

RETINA = "Shapes-Detection/bifpn_retinanet.yaml"
RCNN = "Shapes-Detection/bifpn_faster_rcnn.yaml"


def _backbone(path=RETINA, *opts):
    return build_backbone(get_config(path, *opts))




def _randomize_norms(module, seed=0):
    """Give every BatchNorm non-trivial running statistics and affine parameters (for eval tests)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return module


def _max_rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------------
# The graph
# ------------------------------------------------------------------------------------------------
def test_graph_five_levels_is_efficientdets():
    # EfficientDet's P3-P7 graph; ids 0-4 = P3..P7 inputs, 5.. = nodes in order.
    expected = [
        (3, [3, 4]),  # P6td  <- P6in, P7in            (id 5)
        (2, [2, 5]),  # P5td  <- P5in, P6td            (id 6)
        (1, [1, 6]),  # P4td  <- P4in, P5td            (id 7)
        (0, [0, 7]),  # P3out <- P3in, P4td            (id 8)
        (1, [1, 7, 8]),  # P4out <- P4in, P4td, P3out  (id 9)
        (2, [2, 6, 9]),  # P5out <- P5in, P5td, P4out  (id 10)
        (3, [3, 5, 10]),  # P6out <- P6in, P6td, P5out (id 11)
        (4, [4, 11]),  # P7out <- P7in, P6out          (id 12)
    ]
    graph = bifpn_graph(5)
    assert graph == expected
    assert bifpn_output_ids(graph, 5) == [8, 9, 10, 11, 12]


def test_graph_three_levels():
    expected = [(1, [1, 2]), (0, [0, 3]), (1, [1, 3, 4]), (2, [2, 5])]
    assert bifpn_graph(3) == expected
    assert bifpn_output_ids(expected, 3) == [4, 5, 6]


def test_graph_six_levels():
    expected = [
        (4, [4, 5]),
        (3, [3, 6]),
        (2, [2, 7]),
        (1, [1, 8]),
        (0, [0, 9]),
        (1, [1, 9, 10]),
        (2, [2, 8, 11]),
        (3, [3, 7, 12]),
        (4, [4, 6, 13]),
        (5, [5, 14]),
    ]
    assert bifpn_graph(6) == expected
    assert bifpn_output_ids(expected, 6) == [10, 11, 12, 13, 14, 15]


def test_graph_two_levels_and_too_few():
    assert bifpn_graph(2) == [(0, [0, 1]), (1, [1, 2])]
    with pytest.raises(ValueError, match="at least 2 levels"):
        bifpn_graph(1)


def test_layer_nodes_follow_graph():
    """The built modules carry the graph: per node the input ids and one edge per input."""
    bb = _backbone()
    for layer in bb.neck.layers:
        assert [(n.target_id, n.input_ids) for n in layer.nodes] == bifpn_graph(5)
        assert [len(n.edges) for n in layer.nodes] == [2, 2, 2, 2, 3, 3, 3, 2]
        # up-sampling edges in the top-down pass, down-sampling edges in the bottom-up pass
        assert [e.direction for e in layer.nodes[0].edges] == [0, -1]
        assert [e.direction for e in layer.nodes[4].edges] == [0, 0, 1]


# ------------------------------------------------------------------------------------------------
# Fusion and resampling
# ------------------------------------------------------------------------------------------------
def test_fast_normalized_fusion_closed_form():
    xs = [torch.randn(2, 3, 4, 5) for _ in range(3)]
    fusion = FastNormalizedFusion(3, eps=1e-4)
    # weights initialised to 1: the mean, shrunk by n / (n + eps)
    torch.testing.assert_close(fusion(xs), sum(xs) / (3 + 1e-4))
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))  # relu clips the negative weight
    expected = (2.0 * xs[0] + 0.5 * xs[2]) / (2.5 + 1e-4)
    torch.testing.assert_close(fusion(xs), expected)


def test_fast_normalized_fusion_gradient_matches_finite_differences():
    fusion = FastNormalizedFusion(3, eps=1e-4).double()
    weight = torch.tensor([0.7, 1.3, 0.4], dtype=torch.double, requires_grad=True)
    xs = [torch.randn(1, 2, 3, 3, dtype=torch.double, requires_grad=True) for _ in range(3)]

    def f(w, a, b, c):
        return torch.func.functional_call(fusion, {"weight": w}, ([a, b, c],))

    assert torch.autograd.gradcheck(f, [weight] + xs)


def test_softmax_and_sum_fusion_closed_form():
    xs = [torch.randn(2, 3, 4, 5) for _ in range(2)]
    soft = SoftmaxFusion(2)
    with torch.no_grad():
        soft.weight.copy_(torch.tensor([0.0, math.log(3.0)]))  # softmax = [1/4, 3/4]
    torch.testing.assert_close(soft(xs), 0.25 * xs[0] + 0.75 * xs[1])
    torch.testing.assert_close(SumFusion()(xs), xs[0] + xs[1])
    assert len(list(SumFusion().parameters())) == 0


def test_resample_up_to_exact_odd_sizes():
    up = Resample(8, 8, -1, lambda c: None)
    x = torch.randn(2, 8, 3, 5)
    # exact x2: plain nearest upsampling
    torch.testing.assert_close(up(x, [6, 10]), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    # odd target (one less): x2 nearest cropped at the bottom / right, aligned at the top-left
    y = up(x, [5, 9])
    assert y.shape == (2, 8, 5, 9)
    torch.testing.assert_close(y, x.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :5, :9])


def ref_max_pool_3x3_s2(x, pad_before):
    """
    3x3 stride-2 max pool written out: output ceil(n / 2) per dim, window i covering input
    rows/cols [2i - pad_before, 2i - pad_before + 3) clipped to the input (what falls outside
    is ignored, i.e. -inf padding).
    """
    h, w = x.shape[-2:]
    oh, ow = -(-h // 2), -(-w // 2)
    ph, pw = pad_before(h), pad_before(w)
    out = x.new_empty(*x.shape[:-2], oh, ow)
    for i in range(oh):
        r0, r1 = max(2 * i - ph, 0), min(2 * i - ph + 3, h)
        for j in range(ow):
            c0, c1 = max(2 * j - pw, 0), min(2 * j - pw + 3, w)
            out[..., i, j] = x[..., r0:r1, c0:c1].amax(dim=(-1, -2))
    return out


def _tf_same_pad_before(n):
    """TensorFlow SAME, k=3, s=2: total padding max((out-1)*2 + 3 - n, 0), floor(half) before."""
    out = -(-n // 2)
    return max((out - 1) * 2 + 3 - n, 0) // 2


REF_POOL = {
    "same": lambda x: ref_max_pool_3x3_s2(x, _tf_same_pad_before),
    "symmetric": lambda x: ref_max_pool_3x3_s2(x, lambda n: 1),
}
EVEN_ODD_SIZES = [(10, 14), (11, 17), (10, 17), (11, 14), (2, 3), (1, 1), (4, 4)]


def _both_odd_or_tiny(h, w):
    """Sizes where the two paddings give the same windows: odd, or 1 / 2 (one window covers all)."""
    return all(n % 2 == 1 or n <= 2 for n in (h, w))


@pytest.mark.parametrize("pool_padding", POOL_PADDINGS)
@pytest.mark.parametrize("hw", EVEN_ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_resample_down_equals_reference(pool_padding, hw):
    down = Resample(4, 4, 1, lambda c: None, pool_padding)
    assert down.same_padding == (pool_padding == "same")
    x = torch.randn(2, 4, *hw) - 3.0  # mostly negative: a zero padding would show
    size = [-(-hw[0] // 2), -(-hw[1] // 2)]
    y = down(x, size)
    assert y.shape[-2:] == tuple(size)
    torch.testing.assert_close(y, REF_POOL[pool_padding](x), rtol=0, atol=0)


@pytest.mark.parametrize("n", [4, 6, 10, 5, 7, 11, 2, 1])
def test_pool_windows_closed_form(n):
    """
    On a ramp increasing along rows and columns the max of a window is its bottom-right pixel, on
    a decreasing one its top-left pixel: this reads off each window's rows. Even n: SAME covers
    rows 2i..2i+2 (the missing last row ignored), symmetric 2i-1..2i+1. Odd n: both 2i-1..2i+1.
    """
    ramp = torch.arange(n * n, dtype=torch.float32).reshape(1, 1, n, n)  # value = row * n + col
    out_n = -(-n // 2)
    i = torch.arange(out_n)
    first = {"same": 2 * i if n % 2 == 0 else (2 * i - 1).clamp(min=0),
             "symmetric": (2 * i - 1).clamp(min=0)}
    last = {"same": (2 * i + 2).clamp(max=n - 1) if n % 2 == 0 else (2 * i + 1).clamp(max=n - 1),
            "symmetric": (2 * i + 1).clamp(max=n - 1)}
    for pool_padding in POOL_PADDINGS:
        down = Resample(1, 1, 1, lambda c: None, pool_padding)
        hi = down(ramp, [out_n, out_n])[0, 0]
        lo = -down(-ramp, [out_n, out_n])[0, 0]
        rows, cols = last[pool_padding][:, None], last[pool_padding][None]
        torch.testing.assert_close(hi, (rows * n + cols).float())
        rows, cols = first[pool_padding][:, None], first[pool_padding][None]
        torch.testing.assert_close(lo, (rows * n + cols).float())


@pytest.mark.parametrize("hw", EVEN_ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pool_paddings_differ_on_even_sizes_agree_on_odd(hw):
    x = torch.randn(3, 5, *hw)
    size = [-(-hw[0] // 2), -(-hw[1] // 2)]
    same, sym = (Resample(5, 5, 1, lambda c: None, p)(x, size) for p in ("same", "symmetric"))
    assert same.shape == sym.shape
    if _both_odd_or_tiny(*hw):
        assert torch.equal(same, sym)
    else:
        assert not torch.allclose(same, sym)


@pytest.mark.parametrize("pool_padding", POOL_PADDINGS)
def test_resample_down_fixes_size(pool_padding):
    down = Resample(4, 4, 1, lambda c: None, pool_padding)
    for hw in [(11, 17), (10, 16)]:
        x = torch.randn(1, 4, *hw)
        pooled = REF_POOL[pool_padding](x)
        assert pooled.shape[-2:] == (-(-hw[0] // 2), -(-hw[1] // 2))
        h, w = pooled.shape[-2:]
        torch.testing.assert_close(down(x, [h, w]), pooled)
        # a bottom-up that floors: crop at the bottom / right
        torch.testing.assert_close(down(x, [h - 1, w - 1]), pooled[:, :, : h - 1, : w - 1])
        # a target larger by one: zero rows / columns at the bottom / right
        y = down(x, [h + 1, w + 1])
        assert y.shape == (1, 4, h + 1, w + 1)
        torch.testing.assert_close(y[:, :, :h, :w], pooled)
        assert y[:, :, h:].abs().sum() == 0 and y[:, :, :, w:].abs().sum() == 0


def test_neck_pool_paddings_agree_on_odd_pyramid_differ_on_even():
    """Same weights: the whole neck is one function on an all-odd pyramid, two on an even one."""
    kw = dict(norm=lambda c: torch.nn.BatchNorm2d(c))
    same = _randomize_norms(BiFPNNeck([8, 16, 32], 5, 16, 2, pool_padding="same", **kw)).eval()
    sym = BiFPNNeck([8, 16, 32], 5, 16, 2, pool_padding="symmetric", **kw).eval()
    sym.load_state_dict(same.state_dict())  # the padding changes no parameter
    # P3-P5 (P6, P7 follow): 33x65, 17x33, 9x17 (5x9, 3x5) / 32x64, 16x32, 8x16 (4x8, 2x4)
    for sizes, agree in [([33, 17, 9], True), ([32, 16, 8], False)]:
        inputs = [torch.randn(2, c, s, 2 * s - s % 2) for c, s in zip([8, 16, 32], sizes)]
        with torch.no_grad():
            a, b = same(inputs), sym(inputs)
        assert [t.shape for t in a] == [t.shape for t in b]
        for lv, (ta, tb) in enumerate(zip(a, b)):
            if agree:
                assert torch.equal(ta, tb), lv
            else:
                assert (ta - tb).abs().max() > 1e-3, lv


def get_cfg_with_libraghm():
    from detectron2.config import get_cfg

    from libraghm import add_libraghm_config

    return add_libraghm_config(get_cfg())


def test_backbone_pool_padding_key_changes_values_not_shapes():
    bbs = {p: _backbone(RETINA, "MODEL.BIFPN.POOL_PADDING", p) for p in POOL_PADDINGS}
    assert get_cfg_with_libraghm().MODEL.BIFPN.POOL_PADDING == "same"  # EfficientDet's, the default
    for p, bb in bbs.items():
        edges = [m for m in bb.neck.modules() if isinstance(m, Resample) and m.direction == 1]
        assert edges and all(e.same_padding == (p == "same") for e in edges)
        _randomize_norms(bb).eval()
    bbs["symmetric"].load_state_dict(bbs["same"].state_dict())
    assert bbs["same"].output_shape() == bbs["symmetric"].output_shape()
    for x in [torch.randn(1, 3, 128, 160), torch.randn(1, 3, 333, 517)]:
        with torch.no_grad():
            a, b = (bbs[p](x) for p in POOL_PADDINGS)
        assert list(a) == list(b)
        for k in a:
            assert a[k].shape == b[k].shape, k
            assert (a[k] - b[k]).abs().max() > 1e-4, k  # even sizes occur: another function


def test_resample_lateral_only_where_channels_differ():
    assert isinstance(Resample(64, 64, 0, lambda c: None).lateral, torch.nn.Identity)
    r = Resample(32, 64, 0, lambda c: torch.nn.BatchNorm2d(c))
    assert r.lateral.weight.shape == (64, 32, 1, 1) and r.lateral.bias is None
    assert isinstance(r.lateral.norm, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("pool_padding", POOL_PADDINGS)
def test_node_is_swish_then_separable_conv_then_bn(pool_padding):
    bb = _randomize_norms(_backbone(RETINA, "MODEL.BIFPN.POOL_PADDING", pool_padding)).eval()
    node = bb.neck.layers[1].nodes[4]  # P4out: 3 inputs, all at width 64
    bn = node.conv[1].norm
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)
    assert node.conv[0].groups == 64 and node.conv[0].kernel_size == (3, 3)
    with torch.no_grad():
        node.fusion.weight.copy_(torch.tensor([0.3, 1.2, 0.8]))
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    feats = [torch.randn(2, 64, h, w) for h, w in sizes]
    feats += [torch.randn(2, 64, *sizes[lv]) for lv in (3, 2, 1, 0)]  # ids 5-8 (top-down nodes)
    with torch.no_grad():
        out = node(feats)
        w = F.relu(node.fusion.weight)
        w = w / (w.sum() + 1e-4)
        fused = w[0] * feats[1] + w[1] * feats[7] + w[2] * REF_POOL[pool_padding](feats[8])
        x = F.silu(fused)
        x = F.conv2d(x, node.conv[0].weight, None, 1, 1, 1, 64)
        x = F.conv2d(x, node.conv[1].weight)
        expected = F.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
    torch.testing.assert_close(out, expected)


def test_relu6_node_is_relu6_then_separable_conv_then_bn():
    """EfficientDet-Lite's activation: ReLU6 on the fused features (clipped at 6, unlike ReLU)."""
    bb = _randomize_norms(_backbone(RETINA, "MODEL.BIFPN.ACTIVATION", "relu6")).eval()
    assert all(isinstance(n.activation, torch.nn.ReLU6) for layer in bb.neck.layers for n in layer.nodes)
    node = bb.neck.layers[1].nodes[0]  # P6td: inputs P6 and P7 at width 64
    bn = node.conv[1].norm
    feats = [torch.randn(2, 64, h, w) * 8 for h, w in [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]]
    with torch.no_grad():
        out = node(feats)
        w = F.relu(node.fusion.weight)
        w = w / (w.sum() + 1e-4)
        fused = w[0] * feats[3] + w[1] * F.interpolate(feats[4], size=(2, 3), mode="nearest")
        assert (fused > 6).any() and (fused < 0).any()  # both ends of ReLU6 are exercised
        x = F.conv2d(fused.clamp(0, 6), node.conv[0].weight, None, 1, 1, 1, 64)
        x = F.conv2d(x, node.conv[1].weight)
        expected = F.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------------------------------------
# Shapes on odd input sizes through Detectron2's padding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,levels", [(RETINA, range(3, 8)), (RCNN, range(2, 7))])
@pytest.mark.parametrize("size_div", [0, 32])
def test_outputs_on_odd_input_sizes(path, levels, size_div):
    bb = _backbone(path, "MODEL.BIFPN.SIZE_DIVISIBILITY", size_div)
    expected_div = 2 ** max(levels) if size_div == 0 else size_div
    assert bb.size_divisibility == expected_div
    assert bb.padding_constraints["size_divisibility"] == expected_div
    names = [f"p{lv}" for lv in levels]
    shapes = bb.output_shape()
    assert list(shapes) == names
    assert [shapes[n].stride for n in names] == [2**lv for lv in levels]
    assert all(shapes[n].channels == 64 for n in names)

    images = ImageList.from_tensors(
        [torch.randn(3, 333, 517), torch.randn(3, 301, 499)],
        bb.size_divisibility,
        padding_constraints=bb.padding_constraints,
    )
    H, W = images.tensor.shape[-2:]
    assert H % expected_div == 0 and W % expected_div == 0 and H >= 333 and W >= 517
    out = bb(images.tensor)
    assert list(out) == names
    for lv, n in zip(levels, names):
        assert out[n].shape == (2, 64, math.ceil(H / 2**lv), math.ceil(W / 2**lv)), n
        if size_div == 0:
            assert out[n].shape[-2:] == (H // 2**lv, W // 2**lv)  # exact halving at every level
        assert torch.isfinite(out[n]).all()


def test_unpadded_odd_input():
    """Without any padding, the edges still resample to each level's exact size."""
    out = _backbone()(torch.randn(1, 3, 333, 517))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [
        (42, 65),
        (21, 33),
        (11, 17),
        (6, 9),
        (3, 5),
    ]


# ------------------------------------------------------------------------------------------------
# Parameter count
# ------------------------------------------------------------------------------------------------
def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_d0_parameter_count_matches_hand_count():
    bb = _backbone(RETINA, "MODEL.BIFPN.WIDTH", 64, "MODEL.BIFPN.REPEATS", 3)  # EfficientDet D0's
    W, R = 64, 3
    C3, C4, C5 = 32, 64, 128  # MODEL.SMALL_RESNET.WIDTHS of the Shapes configs (res3..res5)
    assert [bb.bottom_up.output_shape()[f].channels for f in ("res3", "res4", "res5")] == [
        C3,
        C4,
        C5,
    ]
    inputs_per_node = [2, 2, 2, 2, 3, 3, 3, 2]  # the P3-P7 graph: 4 top-down + 4 bottom-up nodes
    node = 9 * W + W * W + 2 * W  # depthwise 3x3 (no bias) + pointwise 1x1 + BN (no conv bias)
    lateral = lambda c: 0 if c == W else c * W + 2 * W  # noqa: E731  1x1 conv + BN
    # first layer only: P3 feeds P3out; P4, P5 feed their top-down and bottom-up nodes (one conv each)
    laterals = 1 * lateral(C3) + 2 * lateral(C4) + 2 * lateral(C5)
    p6 = lateral(C5)  # P6 = maxpool(BN(conv1x1(C5))), P7 = maxpool(P6): no parameters
    expected = p6 + R * (len(inputs_per_node) * node + sum(inputs_per_node)) + laterals
    assert _count(bb.neck) == expected == 142393
    assert _count(bb) == _count(bb.bottom_up) + expected


def test_parameter_count_regular_conv_sum_fusion_no_norm():
    bb = _backbone(
        RETINA,
        "MODEL.BIFPN.WIDTH",
        48,
        "MODEL.BIFPN.REPEATS",
        2,
        "MODEL.BIFPN.SEPARABLE_CONV",
        False,
        "MODEL.BIFPN.FUSION",
        "sum",
        "MODEL.BIFPN.NORM",
        "",
    )
    W, C3, C4, C5 = 48, 32, 64, 128
    node = 9 * W * W + W  # regular 3x3 conv with bias
    lateral = lambda c: c * W + W  # noqa: E731  every input differs from W=48 now
    expected = lateral(C5) + 2 * 8 * node + lateral(C3) + 2 * lateral(C4) + 2 * lateral(C5)
    assert _count(bb.neck) == expected


def test_width_and_repeats_of_efficientdet_d1():
    bb = _backbone(RETINA, "MODEL.BIFPN.WIDTH", 88, "MODEL.BIFPN.REPEATS", 4)
    assert len(bb.neck.layers) == 4
    assert all(s.channels == 88 for s in bb.output_shape().values())
    out = bb(torch.randn(2, 3, 128, 128))
    assert all(v.shape[1] == 88 for v in out.values())


def test_the_removed_preset_key_names_its_replacements(tmp_path):
    """MODEL.BIFPN.PRESET became MODEL.EFFICIENTDET.PRESET (the whole detector): a config that still
    sets it fails at merge time, on the command line and in a yaml file, saying what to set."""
    wanted = r"MODEL\.BIFPN\.PRESET was renamed to MODEL\.BIFPN\.WIDTH.*REPEATS.*D1 88/4.*EFFICIENTDET\.PRESET"
    with pytest.raises(KeyError, match=wanted):
        get_config(RETINA, "MODEL.BIFPN.PRESET", "D1")
    yaml = tmp_path / "old.yaml"
    yaml.write_text(f'_BASE_: "{config_path(RETINA)}"\nMODEL:\n  BIFPN:\n    PRESET: D0\n')
    cfg = add_libraghm_config(get_cfg())
    with pytest.raises(KeyError, match=wanted):
        cfg.merge_from_file(str(yaml))
    assert "PRESET" not in cfg.MODEL.BIFPN


def test_other_norms_build_and_run():
    expected = {
        "GN": torch.nn.GroupNorm,
        "SyncBN": torch.nn.SyncBatchNorm,
        "BN": torch.nn.BatchNorm2d,
    }
    for norm in ("GN", "SyncBN", ""):
        bb = _backbone(RETINA, "MODEL.BIFPN.NORM", norm, "MODEL.BIFPN.FUSION", "softmax")
        norms = [m for m in bb.neck.modules() if isinstance(m, tuple(expected.values()))]
        if norm == "":
            assert norms == []
        else:
            # one per node; per first-layer lateral (C3: 1 edge, C5: 2 edges; C4 = width: none); P6
            assert len(norms) == 3 * 8 + 3 + 1
            assert all(type(m) is expected[norm] for m in norms)
        out = bb(torch.randn(2, 3, 128, 128))  # SyncBatchNorm runs as BN without a process group
        assert all(torch.isfinite(v).all() for v in out.values())


# ------------------------------------------------------------------------------------------------
# TorchScript and ONNX
# ------------------------------------------------------------------------------------------------
def test_torchscript_reproduces_eager():
    import detectron2.export  # noqa: F401  Detectron2's patch that makes its ResNet scriptable

    bb = _randomize_norms(_backbone()).eval()
    x = torch.randn(2, 3, 333, 517)
    with torch.no_grad():
        eager = bb(x)
        scripted = torch.jit.script(bb)(x)
        neck_in = [bb.bottom_up(x)[f] for f in bb.in_features]
        neck_scripted = torch.jit.script(bb.neck)(neck_in)
    assert list(scripted) == list(eager)
    for i, k in enumerate(eager):
        assert _max_rel_err(scripted[k], eager[k]) < 1e-5
        assert _max_rel_err(neck_scripted[i], eager[k]) < 1e-5


class _TupleOutputs(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.names = list(backbone.output_shape())

    def forward(self, x):
        out = self.backbone(x)
        return tuple(out[k] for k in self.names)


def test_onnx_export_reproduces_eager():
    pytest.importorskip("onnx")
    bb = _randomize_norms(_backbone())
    model = _TupleOutputs(bb).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 256, 384),),
            f,
            opset_version=17,
            input_names=["images"],
            output_names=model.names,
            dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}},
        )
    model.eval()  # the exporter restores the wrapper's mode recursively
    try:
        import onnxruntime as ort
    except ImportError:  # verify the graph at least, and compare eager with TorchScript instead
        import onnx

        onnx.checker.check_model(onnx.load_from_string(f.getvalue()))
        pytest.skip("onnxruntime is not installed")
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 256, 384), (2, 3, 333, 517)]:  # the export size and another, odd one
        x = torch.randn(*shape)
        with torch.no_grad():
            eager = model(x)
        got = sess.run(None, {"images": x.numpy()})
        for g, e in zip(got, eager):
            assert g.shape == tuple(e.shape)
            assert _max_rel_err(torch.from_numpy(g), e) < 1e-4


# ------------------------------------------------------------------------------------------------
# Real Detectron2 detectors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [RETINA, RCNN])
def test_detector_trains_a_step(path):
    cfg = get_config(path)
    model = build_model(cfg)
    model.train()
    assert isinstance(model.backbone, BiFPN)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = tiny_batch(2, 128, 160, with_gt=(True, False))  # the second image has no ground truth
    fusion_before = model.backbone.neck.layers[0].nodes[4].fusion.weight.detach().clone()
    for step in range(2):
        with EventStorage(step):
            losses = model(batch)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        total.backward()
        g = model.backbone.neck.layers[0].nodes[4].fusion.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        for n, p in model.backbone.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), n
        opt.step()
    assert not torch.equal(fusion_before, model.backbone.neck.layers[0].nodes[4].fusion.weight)
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"]}])
    assert torch.isfinite(out[0]["instances"].pred_boxes.tensor).all()


# ------------------------------------------------------------------------------------------------
# Bad configs and arguments
# ------------------------------------------------------------------------------------------------
def spec_message(key, spec, value):
    """The validation error a PARAMS spec gives for ``value`` at ``key`` (the oracle)."""
    return f"{key} = {value!r} is invalid: expected {spec.describe()}."


def _bifpn_msg(arg, value):
    return re.escape(spec_message(f"MODEL.BIFPN.{arg.upper()}", BiFPN.PARAMS[arg], value))


def _set(cfg, key, value):
    """Set a config value through the Python API (no yacs type coercion, as user code can)."""
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    setattr(node, leaf, value)


def _invalid_values(spec):
    """Values outside a spec: wrong types, non-finite floats, booleans as strings, out of range."""
    if isinstance(spec, Int):
        return [spec.low - 1, True, spec.low + 0.5, str(spec.low)]
    if isinstance(spec, Float):
        vals = [float("nan"), float("inf"), True, "0.5"]
        vals.append(spec.low if spec.low_open else spec.low - 1.0)
        if spec.high is not None:
            vals += [spec.high + 0.5, float("-inf")]
        return vals
    if isinstance(spec, Bool):
        return ["True", "False", 1, None]
    if isinstance(spec, OneOf):
        return ["bogus", None] + [c.upper() for c in spec.choices if c.upper() != c][:1]
    if isinstance(spec, StrList):
        return [[], "res3", ["res3", 4]]
    raise AssertionError(f"no invalid values for {spec}")


BAD_ARGS = [(a, v) for a, spec in BiFPN.PARAMS.items() for v in _invalid_values(spec)]


class _StubBottomUp(Backbone):
    """res3..res5 at strides 8..32 with 8, 16, 32 channels (only its output_shape is used)."""

    def __init__(self):
        super().__init__()
        self._out_features = ["res3", "res4", "res5"]
        self._out_feature_channels = {"res3": 8, "res4": 16, "res5": 32}
        self._out_feature_strides = {"res3": 8, "res4": 16, "res5": 32}

    def forward(self, x):
        raise NotImplementedError


def test_bad_value_table_covers_every_param():
    assert {a for a, _ in BAD_ARGS} == set(BiFPN.PARAMS)
    assert "pool_padding" in BiFPN.PARAMS and "gn_num_groups" in BiFPN.PARAMS
    for arg, value in BAD_ARGS:
        assert not BiFPN.PARAMS[arg].is_valid(value), (arg, value)


@pytest.mark.parametrize("arg, value", BAD_ARGS, ids=[f"{a}={v!r}" for a, v in BAD_ARGS])
def test_constructor_rejects_bad_arguments(arg, value):
    kwargs = {"in_features": ["res3", "res4", "res5"], "top_level": 7, arg: value}
    with pytest.raises(ValueError) as err:
        BiFPN(_StubBottomUp(), **kwargs)
    assert str(err.value) == spec_message(arg, BiFPN.PARAMS[arg], value)


@pytest.mark.parametrize("arg, value", BAD_ARGS, ids=[f"{a}={v!r}" for a, v in BAD_ARGS])
def test_config_rejects_bad_values_naming_the_key(arg, value):
    """Through the Python API (any type reaches the builder): the key is named at build time."""
    cfg = cached_config(RETINA)
    key = f"MODEL.BIFPN.{arg.upper()}"
    _set(cfg, key, value)
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    assert str(err.value) == spec_message(key, BiFPN.PARAMS[arg], value)


def test_exact_messages_yaml_and_constructor(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text(f'_BASE_: "{config_path(RETINA)}"\nMODEL:\n  BIFPN:\n    WIDTH: 0\n')
    cfg = get_cfg()
    add_libraghm_config(cfg)
    cfg.merge_from_file(str(yaml))
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    assert str(err.value) == "MODEL.BIFPN.WIDTH = 0 is invalid: expected an integer >= 1."
    with pytest.raises(ValueError) as err:
        BiFPN(_StubBottomUp(), ["res3", "res4", "res5"], 7, width=0)
    assert str(err.value) == "width = 0 is invalid: expected an integer >= 1."


@pytest.mark.parametrize(
    "opts,sets,pattern",
    [
        (["MODEL.BIFPN.FUSION", "attention"], {}, _bifpn_msg("fusion", "attention")),
        (["MODEL.BIFPN.NORM", "LN"], {}, _bifpn_msg("norm", "LN")),
        (["MODEL.BIFPN.ACTIVATION", "gelu"], {}, _bifpn_msg("activation", "gelu")),
        (["MODEL.BIFPN.POOL_PADDING", "valid"], {}, _bifpn_msg("pool_padding", "valid")),
        (["MODEL.BIFPN.IN_FEATURES", ["res5"], "MODEL.BIFPN.TOP_LEVEL", 5], {},
         r"MODEL\.BIFPN\.TOP_LEVEL = 5 is invalid: a BiFPN needs at least 2 levels"),
        (["MODEL.BIFPN.IN_FEATURES", ["res3", "res5"]], {},
         r"MODEL\.BIFPN\.IN_FEATURES = \['res3', 'res5'\] is invalid: their strides \[8, 32\]"),
        (["MODEL.BIFPN.IN_FEATURES", ["res4", "res3"]], {},
         r"MODEL\.BIFPN\.IN_FEATURES = \['res4', 'res3'\] is invalid: their strides \[16, 8\]"),
        (["MODEL.BIFPN.IN_FEATURES", ["res3", "res4", "res6"]], {},
         r"MODEL\.BIFPN\.IN_FEATURES = \[.*'res6'\] is invalid: the bottom-up produces only .*"
         r"missing \['res6'\]"),
        (["MODEL.BIFPN.TOP_LEVEL", 4], {},
         r"MODEL\.BIFPN\.TOP_LEVEL = 4 is invalid: it is below the level of the last input"),
        (["MODEL.BIFPN.WIDTH", 0], {}, _bifpn_msg("width", 0)),
        (["MODEL.BIFPN.REPEATS", 0], {}, _bifpn_msg("repeats", 0)),
        (["MODEL.BIFPN.NORM", "GN", "MODEL.BIFPN.WIDTH", 88], {},
         r"MODEL\.BIFPN\.GN_NUM_GROUPS = 32 is invalid: it must divide the width \(88\)"),
        (["MODEL.BIFPN.FUSION_EPS", 0.0], {}, _bifpn_msg("fusion_eps", 0.0)),
        # Non-finite floats pass yacs (a float for a float) and are caught at build.
        (["MODEL.BIFPN.FUSION_EPS", float("nan")], {}, _bifpn_msg("fusion_eps", float("nan"))),
        (["MODEL.BIFPN.BN_EPS", float("inf")], {}, _bifpn_msg("bn_eps", float("inf"))),
        (["MODEL.BIFPN.BN_MOMENTUM", float("nan")], {}, _bifpn_msg("bn_momentum", float("nan"))),
        # Booleans given as strings through the Python API.
        ([], {"MODEL.BIFPN.SEPARABLE_CONV": "False"}, _bifpn_msg("separable_conv", "False")),
        ([], {"MODEL.BIFPN.SEPARABLE_CONV": "True"}, _bifpn_msg("separable_conv", "True")),
        (["MODEL.BIFPN.SIZE_DIVISIBILITY", -1], {}, _bifpn_msg("size_divisibility", -1)),
        (["MODEL.BIFPN.BOTTOM_UP", "build_no_such_backbone"], {},
         r"MODEL\.BIFPN\.BOTTOM_UP = 'build_no_such_backbone' is invalid: expected a bottom-up"),
        (["MODEL.BIFPN.BOTTOM_UP", "build_bifpn_backbone"], {},
         r"MODEL\.BIFPN\.BOTTOM_UP = 'build_bifpn_backbone' is invalid: expected a bottom-up"),
        # The narrow bottom-up (MODEL.SMALL_RESNET: 4 integers >= 1 each).
        (["MODEL.SMALL_RESNET.WIDTHS", [16, 32.5, 64, 128]], {},
         re.escape("MODEL.SMALL_RESNET.WIDTHS = [16, 32.5, 64, 128] is invalid: "
                   f"expected {SMALL_RESNET_PARAMS['widths'].describe()}.")),
        (["MODEL.SMALL_RESNET.WIDTHS", [16, 32, 64]], {},
         re.escape("MODEL.SMALL_RESNET.WIDTHS = [16, 32, 64] is invalid: "
                   "expected 4 integers >= 1.")),
        (["MODEL.SMALL_RESNET.BLOCKS", [1, 1, 1, 1.0]], {},
         r"MODEL\.SMALL_RESNET\.BLOCKS = \[1, 1, 1, 1\.0\] is invalid: expected 4 integers >= 1\."),
    ],
)
def test_bad_configs_raise_at_build_time(opts, sets, pattern):
    cfg = cached_config(RETINA, *opts)
    for key, value in sets.items():
        _set(cfg, key, value)
    with pytest.raises(ValueError, match=pattern):
        build_model(cfg)


def test_gn_num_groups():
    bb = BiFPN(_StubBottomUp(), ["res3", "res4", "res5"], 7, width=48, repeats=1, norm="GN",
               gn_num_groups=8)
    gns = [m for m in bb.neck.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(gns) == 8 + 5 + 1 and all(m.num_groups == 8 for m in gns)  # nodes, laterals, P6
    with pytest.raises(ValueError, match=r"^gn_num_groups = 32 is invalid: it must divide the "
                                         r"width \(48\)\.$"):
        BiFPN(_StubBottomUp(), ["res3", "res4", "res5"], 7, width=48, norm="GN")
    with pytest.raises(TypeError):
        BiFPN(_StubBottomUp(), ["res3", "res4", "res5"], 7, gn_groups=8)  # the old name
    # From the config: D1's width 88 with 8 groups (the docs' example).
    bb = _backbone(RETINA, "MODEL.BIFPN.WIDTH", 88, "MODEL.BIFPN.REPEATS", 4, "MODEL.BIFPN.NORM", "GN",
                   "MODEL.BIFPN.GN_NUM_GROUPS", 8)
    gns = [m for m in bb.neck.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert gns and all(m.num_groups == 8 and m.num_channels == 88 for m in gns)


def test_old_keys_name_the_new_ones():
    msg = r"LIBRAGHM\.BIFPN\.WIDTH was renamed to MODEL\.BIFPN\.WIDTH"
    with pytest.raises(KeyError, match=msg):
        get_config(RETINA, "LIBRAGHM.BIFPN.WIDTH", 32)


@pytest.mark.parametrize(
    "path,opts",
    [
        (RETINA, ["MODEL.BIFPN.TOP_LEVEL", 6]),  # P3-P6 under a head that reads P3-P7
        (RCNN, ["MODEL.BIFPN.IN_FEATURES", ["res3", "res4", "res5"]]),  # P3-P6 under RPN P2-P6
    ],
    ids=["retinanet_top_level_6", "rcnn_from_res3"],
)
def test_level_count_mismatch_with_heads_fails_naming_the_key(path, opts):
    cfg = get_config(path, *opts)
    with pytest.raises(ValueError, match=r"MODEL\.(RPN|ROI_HEADS|RETINANET)\.IN_FEATURES = .* is invalid with this backbone: it produces .*MODEL\.(BFP|BIFPN)"):
        build_model(cfg)


def test_neck_alone_rejects_no_levels():
    with pytest.raises(ValueError, match="at least 2 levels"):
        BiFPNNeck([32], 1, 64, 1)
