"""Balanced Feature Pyramid (libraghm/backbone/bfp.py) and its non-local refine (non_local.py)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import cached_config, config_path, get_config, spec_message, tiny_batch
from libraghm import add_libraghm_config
from libraghm.backbone.bfp import REFINE_TYPES, RESIZE_MODES, BalancedFeaturePyramid
from libraghm.backbone.non_local import ATTENTION_IMPLS, NonLocal2d, embedded_gaussian_attention
from libraghm.backbone.small_resnet import PARAMS as SMALL_RESNET_PARAMS

FRCNN = "Shapes-Detection/bfp_faster_rcnn.yaml"
RETINA = "Shapes-Detection/bfp_retinanet.yaml"


def _cfg(path=FRCNN, *opts):
    return get_config(path, *opts)


def _bfp(*opts, path=FRCNN):
    cfg = _cfg(path, *opts)
    return build_backbone(cfg)




def _level_sizes(h, w, strides):
    """Ceil-sized maps of an unpadded h x w input (Detectron2's stride-2 convs/pools give ceil)."""
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


# ---------------------------------------------------------------------------------------------
# Direct references, written out straightforwardly.
# ---------------------------------------------------------------------------------------------
def ref_max_down(x, size, f):
    """Max over the window [f*i, f*i+f) x [f*j, f*j+f) (clipped at the border) for each output pixel."""
    out = x.new_empty(x.shape[0], x.shape[1], *size)
    for i in range(size[0]):
        for j in range(size[1]):
            out[:, :, i, j] = x[:, :, f * i : f * i + f, f * j : f * j + f].amax(dim=(-1, -2))
    return out


def ref_nearest_up(x, size, f):
    """Output pixel (i, j) copies input pixel (i // f, j // f)."""
    iy = torch.arange(size[0]) // f
    ix = torch.arange(size[1]) // f
    return x[:, :, iy][:, :, :, ix]


def ref_adaptive_max(x, size):
    """mmdetection's adaptive_max_pool2d: window [floor(i*S/T), ceil((i+1)*S/T))."""
    h, w = x.shape[-2:]
    out = x.new_empty(x.shape[0], x.shape[1], *size)
    for i in range(size[0]):
        y0, y1 = (i * h) // size[0], -(-((i + 1) * h) // size[0])
        for j in range(size[1]):
            x0, x1 = (j * w) // size[1], -(-((j + 1) * w) // size[1])
            out[:, :, i, j] = x[:, :, y0:y1, x0:x1].amax(dim=(-1, -2))
    return out


def ref_size_nearest(x, size):
    """mmdetection's F.interpolate(size=..., mode="nearest"): source index floor(dst * S / T)."""
    h, w = x.shape[-2:]
    iy = (torch.arange(size[0]) * h) // size[0]
    ix = (torch.arange(size[1]) * w) // size[1]
    return x[:, :, iy][:, :, :, ix]


def ref_bfp(levels, strides, r, refine=lambda t: t, adaptive=False):
    """Gather (resize to level r), average, refine, scatter (resize back), residual add."""
    size = levels[r].shape[-2:]

    def down(x, sz, f):
        return ref_adaptive_max(x, sz) if adaptive else ref_max_down(x, sz, f)

    def up(x, sz, f):
        return ref_size_nearest(x, sz) if adaptive else ref_nearest_up(x, sz, f)

    gathered = []
    for i, x in enumerate(levels):
        if i < r:
            gathered.append(down(x, size, strides[r] // strides[i]))
        elif i > r:
            gathered.append(up(x, size, strides[i] // strides[r]))
        else:
            gathered.append(x)
    bsf = sum(gathered) / len(gathered)
    refined = refine(bsf)
    outs = []
    for i, x in enumerate(levels):
        sz = x.shape[-2:]
        if i < r:
            outs.append(x + up(refined, sz, strides[r] // strides[i]))
        elif i > r:
            outs.append(x + down(refined, sz, strides[i] // strides[r]))
        else:
            outs.append(x + refined)
    return bsf, outs


# ---------------------------------------------------------------------------------------------
# Gather / average / scatter
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("refine_level", [0, 1, 2, 3, 4])
@pytest.mark.parametrize(
    "hw", [(333, 517), (352, 544), (45, 71)], ids=["333x517", "352x544", "45x71"]
)
def test_gather_scatter_equals_direct_computation(refine_level, hw):
    bfp = _bfp("MODEL.BFP.REFINE", "none", "MODEL.BFP.REFINE_LEVEL", refine_level)
    strides = [bfp.output_shape()[k].stride for k in bfp.in_features]
    assert strides == [4, 8, 16, 32, 64]
    levels = [torch.randn(2, 3, *s) for s in _level_sizes(*hw, strides)]
    bsf = bfp.gather(levels)
    outs = bfp.scatter(bfp.refine(bsf), levels)
    ref_bsf, ref_outs = ref_bfp(levels, strides, refine_level)
    assert bsf.shape == levels[refine_level].shape
    torch.testing.assert_close(bsf, ref_bsf, rtol=0, atol=1e-6)
    for out, ref, x in zip(outs, ref_outs, levels):
        assert out.shape == x.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_default_reference_level_is_stride_16():
    assert _bfp().refine_level == 2  # P2-P6 -> P4
    assert _bfp(path=RETINA).refine_level == 1  # P3-P7 -> P4
    assert _bfp(path=RETINA).in_features == ["p3", "p4", "p5", "p6", "p7"]


@pytest.mark.parametrize("refine", ["none", "conv", "non_local"])
def test_forward_equals_reference_on_real_fpn(refine):
    """The wrapper's forward on a real FPN and a padded 333x517 image, against the direct formula."""
    bfp = _bfp("MODEL.BFP.REFINE", refine).eval()
    if refine == "non_local":  # make the refine non-trivial
        torch.nn.init.normal_(bfp.refine.conv_out.weight, std=0.1)
    images = ImageList.from_tensors([torch.randn(3, 333, 517)], bfp.size_divisibility)
    assert tuple(images.tensor.shape[-2:]) == (352, 544)
    with torch.no_grad():
        out = bfp(images.tensor)
        fpn_out = bfp.fpn(images.tensor)
        levels = [fpn_out[k] for k in bfp.in_features]
        strides = [bfp.output_shape()[k].stride for k in bfp.in_features]
        if refine == "none":
            refine_fn = lambda t: t  # noqa: E731
        elif refine == "conv":
            conv = bfp.refine
            refine_fn = lambda t: F.relu(
                F.conv2d(t, conv.weight, conv.bias, padding=1)
            )  # noqa: E731
        else:
            refine_fn = bfp.refine  # checked against its own reference below
        _, ref_outs = ref_bfp(levels, strides, 2, refine_fn)
    assert list(out) == list(fpn_out)
    for k, ref in zip(bfp.in_features, ref_outs):
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-5)


def test_adaptive_mode_matches_mmdetection_formula():
    bfp = _bfp("MODEL.BFP.REFINE", "none", "MODEL.BFP.RESIZE_MODE", "adaptive")
    strides = [4, 8, 16, 32, 64]
    levels = [torch.randn(1, 2, *s) for s in _level_sizes(333, 517, strides)]
    outs = bfp.scatter(bfp.gather(levels), levels)
    ref_bsf, ref_outs = ref_bfp(levels, strides, 2, adaptive=True)
    torch.testing.assert_close(bfp.gather(levels), ref_bsf, rtol=0, atol=1e-6)
    for out, ref in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # On ceil-sized maps the two modes differ (P6 6x9 vs P4 21x33 is not an exact 4x ratio) ...
    strided = _bfp("MODEL.BFP.REFINE", "none")
    assert not torch.allclose(strided.gather(levels), ref_bsf)
    # ... and agree exactly wherever every size divides.
    even = [torch.randn(1, 2, *s) for s in _level_sizes(256, 512, strides)]
    torch.testing.assert_close(strided.gather(even), bfp.gather(even), rtol=0, atol=0)
    for a, b in zip(
        strided.scatter(strided.gather(even), even), bfp.scatter(bfp.gather(even), even)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _backward_nodes(tensors):
    """Names of all autograd nodes behind ``tensors``."""
    seen, stack, names = set(), [t.grad_fn for t in tensors if t.grad_fn is not None], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("hw", [(333, 517), (352, 544), (256, 512)])
def test_strided_mode_backward_has_no_adaptive_pooling(hw):
    """Power-of-two ratios with ceil/floor sizes: strided max pool only (deterministic CUDA backward)."""
    bfp = _bfp("MODEL.BFP.REFINE", "conv")
    levels = [
        torch.randn(1, 64, *s, requires_grad=True) for s in _level_sizes(*hw, [4, 8, 16, 32, 64])
    ]
    outs = bfp.scatter(bfp.refine(bfp.gather(levels)), levels)
    names = _backward_nodes(outs)
    assert "MaxPool2DWithIndicesBackward0" in names
    assert not any("Adaptive" in n for n in names), names
    sum(o.sum() for o in outs).backward()
    assert all(torch.isfinite(x.grad).all() for x in levels)


def test_adaptive_pooling_only_where_sizes_do_not_fit():
    bfp = _bfp("MODEL.BFP.REFINE", "none")
    sizes = _level_sizes(352, 544, [4, 8, 16, 32, 64])
    sizes[4] = (7, 9)  # 7 is neither floor nor ceil of 22 / 4: the documented fallback
    levels = [torch.randn(1, 2, *s, requires_grad=True) for s in sizes]
    outs = bfp.scatter(bfp.gather(levels), levels)
    assert [o.shape for o in outs] == [x.shape for x in levels]
    assert "AdaptiveMaxPool2DBackward0" in _backward_nodes(outs)
    mm = _bfp("MODEL.BFP.REFINE", "none", "MODEL.BFP.RESIZE_MODE", "adaptive")
    assert "AdaptiveMaxPool2DBackward0" in _backward_nodes(mm.scatter(mm.gather(levels), levels))


def test_any_number_of_levels_and_single_level():
    # Three levels (P4-P6): the reference is index 0 by default; every index works.
    opts = (
        "MODEL.RESNETS.OUT_FEATURES",
        ["res4", "res5"],
        "MODEL.FPN.IN_FEATURES",
        ["res4", "res5"],
        "MODEL.BFP.REFINE",
        "none",
        "MODEL.RPN.IN_FEATURES",  # the heads read what the 3-level pyramid gives
        ["p4", "p5", "p6"],
        "MODEL.ROI_HEADS.IN_FEATURES",
        ["p4", "p5"],
    )
    for level in (-1, 0, 1, 2):
        bfp = _bfp(*opts, "MODEL.BFP.REFINE_LEVEL", level)
        assert bfp.in_features == ["p4", "p5", "p6"]
        levels = [torch.randn(1, 2, *s) for s in _level_sizes(333, 517, [16, 32, 64])]
        r = 0 if level == -1 else level
        _, ref = ref_bfp(levels, [16, 32, 64], r)
        for out, exp in zip(bfp.scatter(bfp.gather(levels), levels), ref):
            torch.testing.assert_close(out, exp, rtol=0, atol=1e-6)
    # A single level (bottom-up res4 at stride 16): out = P + refine(P).
    bfp = _bfp(
        "MODEL.RESNETS.OUT_FEATURES",
        ["res4"],
        "MODEL.BFP.FPN_BUILDER",
        "build_small_resnet_backbone",
        "MODEL.BFP.REFINE",
        "conv",
        "MODEL.RPN.IN_FEATURES",
        ["res4"],
        "MODEL.ROI_HEADS.IN_FEATURES",
        ["res4"],
    ).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        p = bfp.fpn(x)["res4"]
        torch.testing.assert_close(bfp(x)["res4"], p + bfp.refine(p))


@pytest.mark.parametrize("path", [FRCNN, RETINA], ids=["faster_rcnn", "retinanet"])
def test_output_names_strides_channels_odd_input(path):
    cfg = _cfg(path)
    bfp = build_backbone(cfg).eval()
    shapes = bfp.output_shape()
    assert shapes == bfp.fpn.output_shape()
    assert bfp.size_divisibility == bfp.fpn.size_divisibility == 32
    assert bfp.padding_constraints == bfp.fpn.padding_constraints
    images = ImageList.from_tensors(
        [torch.randn(3, 333, 517)],
        bfp.size_divisibility,
        padding_constraints=bfp.padding_constraints,
    )
    h, w = images.tensor.shape[-2:]
    with torch.no_grad():
        out = bfp(images.tensor)
    expected = ["p2", "p3", "p4", "p5", "p6"] if path == FRCNN else ["p3", "p4", "p5", "p6", "p7"]
    assert list(out) == list(shapes) == expected
    for name, t in out.items():
        s = shapes[name].stride
        assert tuple(t.shape) == (1, cfg.MODEL.FPN.OUT_CHANNELS, math.ceil(h / s), math.ceil(w / s))
        assert torch.isfinite(t).all()


# ---------------------------------------------------------------------------------------------
# Non-local refine
# ---------------------------------------------------------------------------------------------
def ref_non_local(block, x, scale=1.0):
    """Materialised embedded Gaussian: z = x + W_z(softmax(theta^T phi) g), explicit matrices."""
    n, c, h, w = x.shape
    theta = F.conv2d(x, block.theta.weight, block.theta.bias).reshape(n, -1, h * w)
    phi = F.conv2d(x, block.phi.weight, block.phi.bias).reshape(n, -1, h * w)
    g = F.conv2d(x, block.g.weight, block.g.bias).reshape(n, -1, h * w)
    f = torch.einsum("nci,ncj->nij", theta, phi) * scale  # (N, HW, HW)
    attn = torch.exp(f - f.amax(-1, keepdim=True))
    attn = attn / attn.sum(-1, keepdim=True)
    y = torch.einsum("nij,ncj->nci", attn, g).reshape(n, -1, h, w)
    return x + F.conv2d(y, block.conv_out.weight, block.conv_out.bias)


def _random_block(c, attention):
    block = NonLocal2d(c, attention=attention)
    for conv in (block.theta, block.phi, block.g, block.conv_out):
        torch.nn.init.normal_(conv.weight, std=0.3)
        torch.nn.init.normal_(conv.bias, std=0.1)
    return block


@pytest.mark.parametrize("attention", ATTENTION_IMPLS)
def test_non_local_is_identity_at_initialisation(attention):
    block = NonLocal2d(16, attention=attention)
    x = torch.randn(2, 16, 7, 9)
    assert torch.equal(block(x), x)
    assert torch.count_nonzero(block.conv_out.weight) == 0
    assert torch.count_nonzero(block.conv_out.bias) == 0
    assert torch.count_nonzero(block.theta.weight) > 0


def test_attention_implementations_and_default():
    assert ATTENTION_IMPLS == ("sdpa", "materialized")
    assert NonLocal2d(8).attention == "sdpa"
    assert "attention='materialized'" in repr(NonLocal2d(8, attention="materialized"))
    # The removed implementations are rejected with the valid choices, not silently mapped.
    for removed in ("auto", "chunked"):
        msg = rf"attention = '{removed}' is invalid: expected one of"
        with pytest.raises(ValueError, match=msg):
            NonLocal2d(8, attention=removed)
        q = torch.randn(1, 4, 2)
        with pytest.raises(ValueError, match=rf"impl = '{removed}' is invalid"):
            embedded_gaussian_attention(q, q, q, impl=removed)
    with pytest.raises(TypeError):
        NonLocal2d(8, attention_impl="sdpa")  # the old argument name is gone


@pytest.mark.parametrize("attention", ATTENTION_IMPLS)
def test_non_local_equals_materialised_reference(attention):
    torch.manual_seed(1)
    block = _random_block(8, attention)
    x = torch.randn(2, 8, 9, 11, requires_grad=True)
    out = block(x)
    ref = ref_non_local(block, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # The attention is far from uniform and the missing 1/sqrt(d) matters.
    assert (out - ref_non_local(block, x, scale=1 / math.sqrt(8))).abs().max() > 1e-2
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, block.theta.weight, block.phi.weight, block.g.weight], gy)
    ref_grads = torch.autograd.grad(
        ref, [x, block.theta.weight, block.phi.weight, block.g.weight], gy
    )
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 8, 9, 11), (1, 16, 1, 1), (3, 4, 5, 2)])
def test_sdpa_equals_materialized_values_and_gradients(shape):
    """The two implementations of MODEL.BFP.ATTENTION: same weights, same outputs and gradients."""
    torch.manual_seed(2)
    sdpa = _random_block(shape[1], "sdpa")
    mat = NonLocal2d(shape[1], attention="materialized")
    mat.load_state_dict(sdpa.state_dict())
    x = torch.randn(*shape) * 2  # peaked softmax rows
    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_s, out_m = sdpa(xs), mat(xm)
    torch.testing.assert_close(out_s, out_m, rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(out_s)
    (out_s * gy).sum().backward()
    (out_m * gy).sum().backward()
    torch.testing.assert_close(xs.grad, xm.grad, rtol=1e-4, atol=1e-4)
    params_m = dict(mat.named_parameters())
    for name, p in sdpa.named_parameters():
        torch.testing.assert_close(p.grad, params_m[name].grad, rtol=1e-4, atol=1e-4, msg=name)
    # Non-trivial gradients (theta / phi get none at a single position: softmax over one key = 1).
    moving = ["g.weight", "conv_out.weight"]
    if x[0, 0].numel() > 1:
        moving += ["theta.weight", "phi.weight"]
    for name in moving:
        assert params_m[name].grad.abs().sum() > 0, name


def _max_saved_numel(fn):
    """Largest tensor autograd saves for backward while running ``fn``."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return max(sizes)


def test_sdpa_never_saves_hw_by_hw_matrix_on_cpu():
    n, length, c = 1, 32 * 32, 8
    q, k, v = (torch.randn(n, length, c, requires_grad=True) for _ in range(3))

    def run(impl):
        return lambda: embedded_gaussian_attention(q, k, v, impl=impl)

    assert _max_saved_numel(run("materialized")) >= length * length
    assert _max_saved_numel(run("sdpa")) <= length * c  # fused SDPA (CPU flash attention)
    # Where PyTorch has no fused kernel it takes its math path, which materialises the matrix
    # (as the module docstring says); the values stay the same.
    with sdpa_kernel([SDPBackend.MATH]):
        assert _max_saved_numel(run("sdpa")) >= length * length
        ref = embedded_gaussian_attention(q, k, v, impl="materialized")
        torch.testing.assert_close(embedded_gaussian_attention(q, k, v), ref, rtol=1e-4, atol=1e-5)


def test_cpu_sdpa_dispatches_to_fused_kernel():
    q = torch.randn(2, 50, 8, requires_grad=True)
    out = embedded_gaussian_attention(q, q, q)  # default impl: "sdpa"
    names = _backward_nodes([out])
    assert any("FlashAttention" in n or "EfficientAttention" in n for n in names), names
    mat = embedded_gaussian_attention(q, q, q, impl="materialized")
    assert not any("Attention" in n for n in _backward_nodes([mat]))


def test_attention_key_selects_the_implementation():
    """MODEL.BFP.ATTENTION reaches the refine block (visible in the module); same function."""
    assert _cfg().MODEL.BFP.ATTENTION == "sdpa"  # the default, not overridden by the configs
    models = {a: _bfp("MODEL.BFP.ATTENTION", a).eval() for a in ATTENTION_IMPLS}
    for a, m in models.items():
        assert m.refine.attention == a
        assert f"attention={a!r}" in repr(m)
    torch.nn.init.normal_(models["sdpa"].refine.conv_out.weight, std=0.1)
    models["materialized"].load_state_dict(models["sdpa"].state_dict())
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        a, b = (models[k](x) for k in ATTENTION_IMPLS)
    assert (a["p4"] - models["sdpa"].fpn(x)["p4"]).abs().max() > 1e-3  # the refine is non-trivial
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Real Detectron2 models
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [FRCNN, RETINA], ids=["faster_rcnn", "retinanet"])
def test_training_steps_finite(path):
    cfg = _cfg(path)
    model = build_model(cfg)
    assert isinstance(model.backbone, BalancedFeaturePyramid)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = tiny_batch(2, 128, 160)
    nl = model.backbone.refine
    with EventStorage():
        for step in range(2):
            losses = model(batch)
            total = sum(losses.values())
            assert all(torch.isfinite(v) for v in losses.values()), losses
            opt.zero_grad()
            total.backward()
            # The zero-initialised W_z gets gradient at once; theta/phi/g once W_z has moved.
            assert nl.conv_out.weight.grad.abs().sum() > 0
            if step == 1:
                assert nl.theta.weight.grad.abs().sum() > 0
            for p in model.parameters():
                if p.grad is not None:
                    assert torch.isfinite(p.grad).all()
            opt.step()


# ---------------------------------------------------------------------------------------------
# Bad configs
# ---------------------------------------------------------------------------------------------
def _spec_message(key, spec, value):
    """The PARAMS oracle's message (conftest.spec_message) as a regex."""
    return re.escape(spec_message(key, spec, value))


def _bfp_msg(arg, value):
    return _spec_message(f"MODEL.BFP.{'REFINE' if arg == 'refine_type' else arg.upper()}",
                         BalancedFeaturePyramid.PARAMS[arg], value)


def _small_resnet_msg(arg, value):
    return _spec_message(f"MODEL.SMALL_RESNET.{arg.upper()}", SMALL_RESNET_PARAMS[arg], value)


def _set(cfg, key, value):
    """Set a config value through the Python API (no yacs type coercion, as user code can)."""
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    setattr(node, leaf, value)


def test_exact_message_from_the_yaml_path(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text(f'_BASE_: "{config_path(FRCNN)}"\nMODEL:\n  BFP:\n    ATTENTION: "chunked"\n')
    cfg = get_cfg()
    add_libraghm_config(cfg)
    cfg.merge_from_file(str(yaml))
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    assert str(err.value) == (
        "MODEL.BFP.ATTENTION = 'chunked' is invalid: expected one of 'sdpa', 'materialized'."
    )


@pytest.mark.parametrize(
    "opts, sets, pattern",
    [
        (("MODEL.BFP.REFINE", "attention"), {}, _bfp_msg("refine_type", "attention")),
        ((), {"MODEL.BFP.REFINE": None}, _bfp_msg("refine_type", None)),
        (("MODEL.BFP.REFINE_LEVEL", 5), {},
         r"MODEL\.BFP\.REFINE_LEVEL = 5 is invalid: expected -1 .*\[0, 4\]"),
        (("MODEL.BFP.REFINE_LEVEL", -2), {}, _bfp_msg("refine_level", -2)),
        ((), {"MODEL.BFP.REFINE_LEVEL": 1.5}, _bfp_msg("refine_level", 1.5)),
        ((), {"MODEL.BFP.REFINE_LEVEL": True}, _bfp_msg("refine_level", True)),
        (("MODEL.BFP.RESIZE_MODE", "bilinear"), {}, _bfp_msg("resize_mode", "bilinear")),
        # The removed attention implementations, and a wrong case.
        (("MODEL.BFP.ATTENTION", "auto"), {}, _bfp_msg("attention", "auto")),
        (("MODEL.BFP.ATTENTION", "chunked"), {}, _bfp_msg("attention", "chunked")),
        (("MODEL.BFP.ATTENTION", "SDPA"), {}, _bfp_msg("attention", "SDPA")),
        (("MODEL.BFP.FPN_BUILDER", "build_no_such_backbone"), {},
         r"MODEL\.BFP\.FPN_BUILDER = 'build_no_such_backbone' is invalid: expected one of \[.*"
         r"'build_resnet_fpn_backbone'"),
        (("MODEL.BFP.FPN_BUILDER", "build_bfp_backbone"), {},
         r"MODEL\.BFP\.FPN_BUILDER = 'build_bfp_backbone' is invalid: "
         r"expected one of \[[^]]*\]\.$"),
        # A bottom-up ResNet: levels of 16, 32, 64, 128 channels.
        (("MODEL.BFP.FPN_BUILDER", "build_small_resnet_backbone"), {},
         r"MODEL\.BFP\.FPN_BUILDER = 'build_small_resnet_backbone' is invalid: .*equal channels.*'res2': \(4, 16\)"),
        # One level at stride 32 and REFINE_LEVEL=-1 (= the level at stride 16).
        (("MODEL.BFP.FPN_BUILDER", "build_small_resnet_backbone",
          "MODEL.RESNETS.OUT_FEATURES", ["res5"]), {},
         r"MODEL\.BFP\.REFINE_LEVEL = -1 is invalid here: .*stride 16.*\[0, 0\]"),
        # The narrow ResNet under the FPN (MODEL.SMALL_RESNET: 4 integers >= 1 each).
        (("MODEL.SMALL_RESNET.WIDTHS", [16, 32.5, 64, 128]), {},
         _small_resnet_msg("widths", [16, 32.5, 64, 128])),
        (("MODEL.SMALL_RESNET.WIDTHS", [16, 32, 64]), {},
         _small_resnet_msg("widths", [16, 32, 64])),
        ((), {"MODEL.SMALL_RESNET.WIDTHS": [16, 32, 64, True]},
         _small_resnet_msg("widths", [16, 32, 64, True])),
        (("MODEL.SMALL_RESNET.BLOCKS", [1, 1, 0, 1]), {},
         _small_resnet_msg("blocks", [1, 1, 0, 1])),
    ],
)
def test_bad_configs_raise_at_build(opts, sets, pattern):
    cfg = cached_config(FRCNN, *opts)
    for key, value in sets.items():
        _set(cfg, key, value)
    with pytest.raises(ValueError, match=pattern):
        build_model(cfg)


@pytest.mark.parametrize(
    "arg, value",
    [("refine_type", v) for v in ("attention", None, 1)]
    + [("refine_level", v) for v in (-2, 1.5, True, "0", float("nan"))]
    + [("resize_mode", v) for v in ("bilinear", "")]
    + [("attention", v) for v in ("auto", "chunked", "SDPA", None)],
)
def test_constructor_rejects_bad_arguments(fpn, arg, value):
    spec = BalancedFeaturePyramid.PARAMS[arg]
    assert not spec.is_valid(value)
    with pytest.raises(ValueError) as err:
        BalancedFeaturePyramid(fpn, **{arg: value})
    assert str(err.value) == f"{arg} = {value!r} is invalid: expected {spec.describe()}."


def test_constructor_accepts_every_valid_choice(fpn):
    for refine in REFINE_TYPES:
        for mode in RESIZE_MODES:
            for attention in ATTENTION_IMPLS:
                bfp = BalancedFeaturePyramid(fpn, refine, 1, mode, attention)
                assert (bfp.refine_type, bfp.refine_level, bfp.resize_mode) == (refine, 1, mode)
    with pytest.raises(ValueError, match=r"^refine_level = 5 is invalid: expected -1"):
        BalancedFeaturePyramid(fpn, refine_level=5)


@pytest.fixture(scope="module")
def fpn():
    return _bfp("MODEL.BFP.REFINE", "none").fpn


def test_old_keys_name_the_new_ones():
    with pytest.raises(KeyError, match=r"LIBRAGHM\.BFP\.REFINE was renamed to MODEL\.BFP\.REFINE"):
        _cfg(FRCNN, "LIBRAGHM.BFP.REFINE", "conv")


@pytest.mark.parametrize(
    "path, opts",
    [
        # P4-P6 under an RPN that reads P2-P6.
        (FRCNN, ("MODEL.RESNETS.OUT_FEATURES", ["res4", "res5"],
                 "MODEL.FPN.IN_FEATURES", ["res4", "res5"])),
        # P2-P6 under a RetinaNet head that reads P3-P7.
        (RETINA, ("MODEL.BFP.FPN_BUILDER", "build_small_resnet_fpn_backbone")),
    ],
    ids=["frcnn_p4_p6", "retinanet_p2_p6"],
)
def test_level_count_mismatch_with_heads_fails_naming_the_key(path, opts):
    cfg = _cfg(path, *opts)
    with pytest.raises(ValueError, match=r"MODEL\.(RPN|ROI_HEADS|RETINANET)\.IN_FEATURES = .* is invalid with this backbone: it produces .*MODEL\.(BFP|BIFPN)"):
        build_model(cfg)


def test_small_resnet_equal_consecutive_widths_fail_at_build():
    """Detectron2's BasicBlock projects the shortcut only where the width changes: equal widths of
    consecutive stages (each halving the resolution) would fail inside the first forward."""
    with pytest.raises(ValueError, match=r"MODEL\.SMALL_RESNET\.WIDTHS = \[8, 16, 16, 32\] is invalid"):
        _bfp("MODEL.SMALL_RESNET.WIDTHS", [8, 16, 16, 32])
