"""Tests of the BiFPN backbone (libraghm/backbone/bifpn.py): graph, fusion, resampling, shapes on odd
input sizes, parameter count, TorchScript / ONNX export, real Detectron2 training steps, bad configs.
"""

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import get_config, tiny_batch
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

from libraghm.backbone.bifpn import (
    BIFPN_PRESETS,
    BiFPN,
    BiFPNNeck,
    FastNormalizedFusion,
    Resample,
    SoftmaxFusion,
    SumFusion,
    bifpn_graph,
    bifpn_output_ids,
)

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


def test_resample_down_pools_and_fixes_size():
    down = Resample(4, 4, 1, lambda c: None)
    x = torch.randn(1, 4, 11, 17)
    pooled = F.max_pool2d(x, 3, 2, 1)
    assert pooled.shape[-2:] == (6, 9)  # ceil(11 / 2), ceil(17 / 2)
    torch.testing.assert_close(down(x, [6, 9]), pooled)
    # a bottom-up that floors: crop at the bottom / right
    torch.testing.assert_close(down(x, [5, 8]), pooled[:, :, :5, :8])
    # a target larger by one: zero rows / columns at the bottom / right
    y = down(x, [7, 10])
    assert y.shape == (1, 4, 7, 10)
    torch.testing.assert_close(y[:, :, :6, :9], pooled)
    assert y[:, :, 6:].abs().sum() == 0 and y[:, :, :, 9:].abs().sum() == 0


def test_resample_lateral_only_where_channels_differ():
    assert isinstance(Resample(64, 64, 0, lambda c: None).lateral, torch.nn.Identity)
    r = Resample(32, 64, 0, lambda c: torch.nn.BatchNorm2d(c))
    assert r.lateral.weight.shape == (64, 32, 1, 1) and r.lateral.bias is None
    assert isinstance(r.lateral.norm, torch.nn.BatchNorm2d)


def test_node_is_swish_then_separable_conv_then_bn():
    bb = _randomize_norms(_backbone()).eval()
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
        fused = w[0] * feats[1] + w[1] * feats[7] + w[2] * F.max_pool2d(feats[8], 3, 2, 1)
        x = F.silu(fused)
        x = F.conv2d(x, node.conv[0].weight, None, 1, 1, 1, 64)
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
    bb = _backbone(path, "LIBRAGHM.BIFPN.SIZE_DIVISIBILITY", size_div)
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
    bb = _backbone(RETINA, "LIBRAGHM.BIFPN.PRESET", "D0")
    W, R = 64, 3
    C3, C4, C5 = 32, 64, 128  # LIBRAGHM.SMALL_RESNET.WIDTHS of the Shapes configs (res3..res5)
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
        "LIBRAGHM.BIFPN.PRESET",
        "",
        "LIBRAGHM.BIFPN.WIDTH",
        48,
        "LIBRAGHM.BIFPN.REPEATS",
        2,
        "LIBRAGHM.BIFPN.SEPARABLE_CONV",
        False,
        "LIBRAGHM.BIFPN.FUSION",
        "sum",
        "LIBRAGHM.BIFPN.NORM",
        "",
    )
    W, C3, C4, C5 = 48, 32, 64, 128
    node = 9 * W * W + W  # regular 3x3 conv with bias
    lateral = lambda c: c * W + W  # noqa: E731  every input differs from W=48 now
    expected = lateral(C5) + 2 * 8 * node + lateral(C3) + 2 * lateral(C4) + 2 * lateral(C5)
    assert _count(bb.neck) == expected


def test_presets_set_width_and_repeats():
    assert BIFPN_PRESETS == {
        "D0": (64, 3),
        "D1": (88, 4),
        "D2": (112, 5),
        "D3": (160, 6),
        "D4": (224, 7),
        "D5": (288, 7),
        "D6": (384, 8),
        "D7": (384, 8),
    }
    bb = _backbone(RETINA, "LIBRAGHM.BIFPN.PRESET", "D1", "LIBRAGHM.BIFPN.WIDTH", 7)
    assert len(bb.neck.layers) == 4
    assert all(s.channels == 88 for s in bb.output_shape().values())
    out = bb(torch.randn(2, 3, 128, 128))
    assert all(v.shape[1] == 88 for v in out.values())


def test_other_norms_build_and_run():
    expected = {
        "GN": torch.nn.GroupNorm,
        "SyncBN": torch.nn.SyncBatchNorm,
        "BN": torch.nn.BatchNorm2d,
    }
    for norm in ("GN", "SyncBN", ""):
        bb = _backbone(RETINA, "LIBRAGHM.BIFPN.NORM", norm, "LIBRAGHM.BIFPN.FUSION", "softmax")
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
# Bad configs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts,key",
    [
        (["LIBRAGHM.BIFPN.FUSION", "attention"], "LIBRAGHM.BIFPN.FUSION"),
        (["LIBRAGHM.BIFPN.NORM", "LN"], "LIBRAGHM.BIFPN.NORM"),
        (["LIBRAGHM.BIFPN.ACTIVATION", "gelu"], "LIBRAGHM.BIFPN.ACTIVATION"),
        (["LIBRAGHM.BIFPN.PRESET", "D8"], "LIBRAGHM.BIFPN.PRESET"),
        (
            ["LIBRAGHM.BIFPN.IN_FEATURES", ["res5"], "LIBRAGHM.BIFPN.TOP_LEVEL", 5],
            "at least 2 levels",
        ),
        (["LIBRAGHM.BIFPN.IN_FEATURES", ["res3", "res5"]], "LIBRAGHM.BIFPN.IN_FEATURES"),
        (["LIBRAGHM.BIFPN.IN_FEATURES", ["res4", "res3"]], "LIBRAGHM.BIFPN.IN_FEATURES"),
        (["LIBRAGHM.BIFPN.IN_FEATURES", ["res3", "res4", "res6"]], "LIBRAGHM.BIFPN.IN_FEATURES"),
        (["LIBRAGHM.BIFPN.TOP_LEVEL", 4], "LIBRAGHM.BIFPN.TOP_LEVEL"),
        (["LIBRAGHM.BIFPN.WIDTH", 0, "LIBRAGHM.BIFPN.PRESET", ""], "LIBRAGHM.BIFPN.WIDTH"),
        (["LIBRAGHM.BIFPN.REPEATS", 0, "LIBRAGHM.BIFPN.PRESET", ""], "LIBRAGHM.BIFPN.REPEATS"),
        (
            ["LIBRAGHM.BIFPN.NORM", "GN", "LIBRAGHM.BIFPN.PRESET", "D1"],
            "LIBRAGHM.BIFPN.GN_NUM_GROUPS",
        ),
        (["LIBRAGHM.BIFPN.FUSION_EPS", 0.0], "LIBRAGHM.BIFPN.FUSION_EPS"),
        (["LIBRAGHM.BIFPN.SIZE_DIVISIBILITY", -1], "LIBRAGHM.BIFPN.SIZE_DIVISIBILITY"),
        (["LIBRAGHM.BIFPN.BOTTOM_UP", "build_no_such_backbone"], "LIBRAGHM.BIFPN.BOTTOM_UP"),
        (["LIBRAGHM.BIFPN.BOTTOM_UP", "build_bifpn_backbone"], "LIBRAGHM.BIFPN.BOTTOM_UP"),
    ],
)
def test_bad_configs_raise_at_build_time(opts, key):
    cfg = get_config(RETINA, *opts)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(cfg)


def test_neck_alone_rejects_no_levels():
    with pytest.raises(ValueError, match="at least 2 levels"):
        BiFPNNeck([32], 1, 64, 1)
