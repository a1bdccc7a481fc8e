"""
Fuzz tests, one per class of silent failure: generated bad keys, diverging runs, degenerate
batches for the logged statistics, half-precision IoUs, overflowing regression targets.

The valid range of every key is the part's ``PARAMS`` table (libraghm/validation.py): the
generators below draw invalid and valid values from those specs, and the expected error message
comes from the same spec. Each test prints its counts (run with ``-s`` to see them):
cases tried, clear errors, accepted, and it fails on any silent or mid-step failure.
"""
import math
import os
import re

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import train_net
from conftest import cached_config, config_path, spec_message, tiny_batch, tiny_train_opts
from libraghm.backbone.bfp import BalancedFeaturePyramid
from libraghm.backbone.bifpn import BiFPN
from libraghm.backbone.efficientnet import EfficientNetBackbone
from libraghm.backbone.small_resnet import PARAMS as SMALL_RESNET_PARAMS
from libraghm.losses.balanced_l1_loss import PARAMS as BALANCED_L1_PARAMS
from libraghm.losses.balanced_l1_loss import balanced_l1_loss
from libraghm.losses.classification import SigmoidFocalLoss
from libraghm.losses.ghm_loss import GHMC, GHMR
from libraghm.modeling.roi_heads import SAMPLING_PARAMS
from libraghm.sampling import IoUBalancedSampler, OHEMSampler
from libraghm.validation import Bool, Float, Int, IntList, OneOf, StrList

# (config node, PARAMS table, a config whose model reads the node [+ overrides], argument -> key)
EFFICIENTNET_RCNN = ("Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
                     "MODEL.BACKBONE.NAME", "build_efficientnet_fpn_backbone",
                     "MODEL.EFFICIENTNET.PRETRAINED", False)
PARTS = [
    ("MODEL.GHM_C", GHMC.PARAMS, "Shapes-Detection/ghm_retinanet.yaml", {}),
    ("MODEL.GHM_R", GHMR.PARAMS, "Shapes-Detection/ghm_retinanet.yaml", {}),
    ("MODEL.RETINANET", SigmoidFocalLoss.PARAMS, "Shapes-Detection/libra_retinanet.yaml", {}),
    ("MODEL.BALANCED_L1", BALANCED_L1_PARAMS, "Shapes-Detection/faster_rcnn_balanced_l1.yaml", {}),
    ("MODEL.BFP", BalancedFeaturePyramid.PARAMS, "Shapes-Detection/bfp_faster_rcnn.yaml",
     {"refine_type": "MODEL.BFP.REFINE"}),
    ("MODEL.BIFPN", BiFPN.PARAMS, "Shapes-Detection/bifpn_retinanet.yaml", {}),
    ("MODEL.SMALL_RESNET", SMALL_RESNET_PARAMS, "Shapes-Detection/faster_rcnn_small_R_FPN.yaml", {}),
    ("MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER", IoUBalancedSampler.PARAMS,
     "Shapes-Detection/libra_sampling_faster_rcnn.yaml", {}),
    ("MODEL.RPN.IOU_BALANCED_SAMPLER", IoUBalancedSampler.PARAMS,
     "Shapes-Detection/libra_sampling_rpn_faster_rcnn.yaml", {}),
    ("MODEL.ROI_HEADS.OHEM", OHEMSampler.PARAMS, "Shapes-Detection/ohem_faster_rcnn.yaml", {}),
    ("MODEL.ROI_HEADS", SAMPLING_PARAMS, "Shapes-Detection/libra_faster_rcnn.yaml", {}),
    ("MODEL.RPN", SAMPLING_PARAMS, "Shapes-Detection/libra_sampling_rpn_faster_rcnn.yaml", {}),
    ("MODEL.EFFICIENTNET", EfficientNetBackbone.PARAMS, EFFICIENTNET_RCNN, {}),
]
# keys whose valid values also depend on other keys (the heads' features; the width, which the
# RetinaNet head's GroupNorm of Detectron2 must divide): kept at their values in the valid-value
# fuzz; their cross-checks have their own tests
COUPLED = {"MODEL.BIFPN.IN_FEATURES", "MODEL.BIFPN.TOP_LEVEL", "MODEL.BFP.REFINE_LEVEL",
           "MODEL.BIFPN.WIDTH"}


def invalid_values(spec):
    """Values a spec must refuse: wrong types, strings, non-finite numbers, just out of range."""
    if isinstance(spec, Bool):
        return ["True", "false", 1, 0, None]
    if isinstance(spec, (Int, Float)):
        out = [float("nan"), float("inf"), "1", True, None]
        if isinstance(spec, Int):
            out.append(1.5 if spec.low is None else spec.low + 0.5)
        for bound, open_, step in ((spec.low, spec.low_open, -1), (spec.high, spec.high_open, 1)):
            if bound is not None:
                out.append(bound if open_ else bound + step * (1 if isinstance(spec, Int) else 1e-3))
        return out
    if isinstance(spec, OneOf):
        strings = [c for c in spec.choices if isinstance(c, str) and c]
        return ["bogus", None, 1] + ([strings[0].swapcase()] if strings and strings[0].swapcase()
                                     not in spec.choices else [])
    if isinstance(spec, IntList):
        n = spec.length or 2
        return [[], "1,2", [1.5] * n, [spec.low - 1] * n, [True] * n] + (
            [[spec.low] * (n + 1)] if spec.length else [])
    if isinstance(spec, StrList):
        return [[], "res3", [1, 2]]
    # a part's own kind of spec: every value of a generic pool that it refuses
    pool = [None, True, 0, -1, 1.5, float("nan"), "", "bogus", [], ["bogus"], [1, 2], {"a": 1}]
    return [v for v in pool if not spec.is_valid(v)]


def valid_value(spec, rng):
    """A random value a spec accepts."""
    if isinstance(spec, Bool):
        return bool(rng.integers(2))
    if isinstance(spec, OneOf):
        return spec.choices[rng.integers(len(spec.choices))]
    if isinstance(spec, IntList):
        return sorted(int(v) for v in rng.integers(spec.low, spec.low + 48, size=spec.length or 2))
    if isinstance(spec, (Int, Float)):
        low = spec.low if spec.low is not None else -3.0
        high = spec.high if spec.high is not None else low + 4.0
        if isinstance(spec, Int):
            high = min(high, low + 4)
            return int(rng.integers(low + spec.low_open, high + 1 - spec.high_open))
        value = float(rng.uniform(low, high))
        return value if spec.is_valid(value) else (low + high) / 2
    return None  # a part's own kind of spec: keep the config's value


def _config(config):
    path, *opts = (config,) if isinstance(config, str) else config
    return cached_config(path, *opts)


def _key(node, arg, overrides):
    return overrides.get(arg, f"{node}.{arg.upper()}")


def _set(cfg, key, value):
    node, leaf = key.rsplit(".", 1)
    parent = cfg
    for part in node.split("."):
        parent = parent[part]
    parent[leaf] = value  # the Python API: no yacs type check, like a user's script


def cfg_get(cfg, key, default):
    node = cfg
    for part in key.split("."):
        if part not in node:
            return default
        node = node[part]
    return node


def _step(model):
    model.train()
    with EventStorage(0) as storage:
        losses = model(tiny_batch(2, seed=3))
        total = sum(losses.values())
        total.backward()
    return losses, storage


@pytest.mark.parametrize("node,params,config,overrides", PARTS, ids=[p[0] for p in PARTS])
def test_fuzz_keys(node, params, config, overrides):
    """Every generated invalid value of every key fails at build with the spec's message naming the
    key; random valid settings of the whole node build and train one step with finite losses, or
    fail at build with a ValueError naming a key of the node (a cross-key constraint)."""
    rng = np.random.default_rng(abs(hash(node)) % 2**32)
    counts = dict(invalid=0, clear_errors=0, valid=0, built_and_stepped=0, cross_key_errors=0)
    for arg, spec in params.items():
        key = _key(node, arg, overrides)
        for bad in invalid_values(spec):
            counts["invalid"] += 1
            cfg = _config(config)
            _set(cfg, key, bad)
            try:
                build_model(cfg)
            except ValueError as e:
                assert spec_message(key, spec, bad) in str(e), (key, bad, str(e))
            else:
                pytest.fail(f"{key} = {bad!r} was accepted by {config}")
            counts["clear_errors"] += 1
    for trial in range(3):
        counts["valid"] += 1
        cfg = _config(config)
        for arg, spec in params.items():
            key = _key(node, arg, overrides)
            value = valid_value(spec, rng)
            if key not in COUPLED and value is not None:
                _set(cfg, key, value)
        if cfg_get(cfg, f"{node}.NONFINITE", None) == "error":
            _set(cfg, f"{node}.NONFINITE", "skip")  # "error" is a host-sync mode tested elsewhere
        torch.manual_seed(trial)
        try:
            model = build_model(cfg)
        except ValueError as e:
            assert node in str(e), str(e)
            counts["cross_key_errors"] += 1
            continue
        losses, _ = _step(model)
        assert all(torch.isfinite(v) for v in losses.values()), (cfg.dump(), losses)
        counts["built_and_stepped"] += 1
    print(f"\nFUZZ keys {node}: {counts}")
    assert counts["invalid"] == counts["clear_errors"] > 0


def test_fuzz_training_keys():
    """Every generated invalid value of a LIBRAGHM training key or an INPUT.SCALE_JITTER key fails in
    check_config (train_net's setup), before anything is built, with the spec's message naming the key."""
    from libraghm import check_config
    from libraghm.config import LIBRAGHM_PARAMS
    from libraghm.data.augmentation import SCALE_JITTER_PARAMS

    cases = 0
    nodes = [("LIBRAGHM", LIBRAGHM_PARAMS), ("INPUT.SCALE_JITTER", SCALE_JITTER_PARAMS)]
    for node, arg, spec in [(n, a, s) for n, params in nodes for a, s in params.items()]:
        key = f"{node}.{arg.upper()}"
        for bad in invalid_values(spec):
            cfg = cached_config("Shapes-Detection/libra_faster_rcnn.yaml")
            _set(cfg, key, bad)
            with pytest.raises(ValueError, match=re.escape(spec_message(key, spec, bad))):
                check_config(cfg)
            cases += 1
    print(f"\nFUZZ keys LIBRAGHM and INPUT.SCALE_JITTER: {cases} invalid values, {cases} clear errors at setup")


DIVERGING = ["Shapes-Detection/faster_rcnn_small_R_FPN.yaml", "Shapes-Detection/ghm_retinanet.yaml",
             "Shapes-Detection/libra_faster_rcnn.yaml", "Shapes-Detection/ohem_faster_rcnn.yaml"]


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_divergence(tmp_path, seed):
    """A random parameter is given NaN/Inf entries (or the learning rate explodes): training stops
    with FloatingPointError whatever the check period, and no final checkpoint is written."""
    rng = np.random.default_rng(seed)
    config = DIVERGING[seed % len(DIVERGING)]
    period = int(rng.integers(0, 3))
    explode = seed % 3 == 2
    out = tmp_path / "run"
    opts = tiny_train_opts(out, 3, "LIBRAGHM.FINITE_CHECK_PERIOD", period,
                           "SOLVER.BASE_LR", 1e30 if explode else 0.01)
    trainer = train_net.Trainer(train_net.setup(_args(config, opts)))
    trainer.resume_or_load(resume=False)
    what = "learning rate 1e30"
    if not explode:
        params = [(n, p) for n, p in trainer.model.named_parameters() if p.numel() > 0]
        name, param = params[rng.integers(len(params))]
        with torch.no_grad():
            flat = param.view(-1)
            idx = torch.from_numpy(rng.choice(flat.numel(), size=max(1, flat.numel() // 7),
                                              replace=False))
            flat[idx] = float(rng.choice([np.nan, np.inf, -np.inf]))
        what = f"{name} ({len(idx)} of {flat.numel()} entries)"
    with pytest.raises(FloatingPointError):
        trainer.train()
    assert not os.path.exists(out / "model_final.pth"), what
    print(f"\nFUZZ divergence {config} period={period} {what}: stopped with FloatingPointError")


def _args(config, opts):
    from detectron2.engine import default_argument_parser

    return default_argument_parser().parse_args(["--config-file", config_path(config), *opts])


def _degenerate_batch(rng):
    """
    tiny_batch with random defects: zero-area, out-of-image, duplicated, huge or no boxes.

    Returns:
        list[dict], bool: the batch, and whether every box is non-empty (Detectron2's DatasetMapper
        removes empty boxes, on which stock box regression is infinite: log(0) targets).
    """
    batch = tiny_batch(2, seed=int(rng.integers(100)), with_gt=(True, bool(rng.integers(2))))
    for d in batch:
        inst = d["instances"]
        boxes = inst.gt_boxes.tensor
        if len(boxes) == 0:
            continue
        kind = rng.choice(["zero_area", "outside", "duplicate", "huge", "line"])
        i = int(rng.integers(len(boxes)))
        if kind == "zero_area":
            boxes[i, 2:] = boxes[i, :2]
        elif kind == "outside":
            boxes[i] = torch.tensor([500.0, 500.0, 520.0, 530.0])
        elif kind == "duplicate":
            boxes[:] = boxes[i]
        elif kind == "huge":
            boxes[i] = torch.tensor([-1e4, -1e4, 1e4, 1e4])
        else:
            boxes[i, 2] = boxes[i, 0]
    return batch, all(bool(d["instances"].gt_boxes.nonempty().all()) for d in batch)


STATS_CONFIGS = ["Shapes-Detection/libra_faster_rcnn.yaml", "Shapes-Detection/ghm_retinanet.yaml",
                 "Shapes-Detection/ohem_faster_rcnn.yaml", "Shapes-Detection/libra_retinanet.yaml",
                 "Shapes-Detection/libra_sampling_rpn_faster_rcnn.yaml"]


@pytest.mark.parametrize("config", STATS_CONFIGS)
def test_fuzz_logged_statistics(config):
    """Degenerate batches with statistics logged every step: no exception, finite scalars and
    histograms in the EventStorage, finite losses unless a box is empty (see _degenerate_batch)."""
    rng = np.random.default_rng(abs(hash(config)) % 2**32)
    model = build_model(cached_config(config, "LIBRAGHM.LOG_PERIOD", 1))
    model.train()
    cases = 0
    for it in range(4):
        batch, nonempty = _degenerate_batch(rng)
        with EventStorage(it) as storage:
            losses = model(batch)
            if nonempty:
                sum(losses.values()).backward()
        assert not nonempty or all(torch.isfinite(v) for v in losses.values()), losses
        logged = [n for n in storage.latest() if n not in losses]
        assert logged, "no statistics were logged"
        for name in logged:
            value = storage.latest()[name][0]
            assert math.isfinite(value), (name, value)
        for h in storage._histograms:
            assert all(math.isfinite(float(h[k])) for k in ("min", "max", "sum", "sum_squares")), h
        cases += 1
    print(f"\nFUZZ statistics {config}: {cases} degenerate batches, 0 errors, all logged values finite")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fuzz_half_precision_ious(dtype):
    """Random half-precision IoUs, crowded at the ends of the range and at bin edges: every sampler
    setting returns in-range, duplicate-free indices with the exact quota the pool allows."""
    cases = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 400))
        num_gt = int(rng.integers(1, 6))
        pool = np.concatenate([rng.random(n), [0.0, 1.0, 1 - 1e-4, 1e-8, 0.5 - 1e-4, 1 / 3]])
        ious = torch.from_numpy(rng.choice(pool, n)).to(dtype)
        labels = torch.from_numpy(np.where(rng.random(n) < 0.3, rng.integers(0, 5, n), 5))
        labels[torch.from_numpy(rng.random(n) < 0.1)] = -1
        gt_index = torch.from_numpy(rng.integers(0, num_gt, n))
        kwargs = dict(num_bins=int(rng.integers(1, 6)), mmdet_compat=bool(rng.integers(2)))
        if rng.integers(2):
            kwargs.update(floor_thresh=float(rng.uniform(0, 0.5)), floor_fraction=float(rng.random()))
        quota = int(rng.integers(1, 256))
        pos, neg = IoUBalancedSampler(**kwargs)(labels, quota, 0.25, 5, ious=ious,
                                                gt_index=gt_index, num_gt=num_gt)
        num_pos = int(((labels >= 0) & (labels != 5)).sum())
        num_neg = int((labels == 5).sum())
        want_pos = min(int(quota * 0.25), num_pos)
        assert len(pos) == want_pos and len(neg) == min(quota - want_pos, num_neg), kwargs
        both = torch.cat([pos, neg])
        assert len(set(both.tolist())) == len(both) and bool(((both >= 0) & (both < n)).all())
        assert bool((labels[pos] != 5).all() & (labels[pos] >= 0).all()) and bool((labels[neg] == 5).all())
        cases += 1
    print(f"\nFUZZ half-precision IoUs {dtype}: {cases} cases, all in range and exact")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fuzz_overflow(dtype):
    """Regression differences of random magnitude, up to where the loss itself is representable
    (float32: 1e30, the sum of 128 ASL1 terms x 10 stays below 3.4e38; float16: 4e4, Balanced L1's
    elementwise 1.5 |d| stays below 65504): GHM-R and Balanced L1 (summed) give finite losses and
    finite gradients."""
    finfo = torch.finfo(dtype)
    top = 30.0 if dtype == torch.float32 else math.log10(4e4)
    cases = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        exps = rng.uniform(-3, top, size=(4, 8, 4))
        target = torch.from_numpy(rng.choice([-1, 1], exps.shape) * 10.0 ** exps)
        target = target.clamp(-float(finfo.max), float(finfo.max)).to(dtype)
        pred = torch.zeros_like(target, requires_grad=True)
        valid = torch.from_numpy(rng.random((4, 8, 1)) < 0.7)
        for loss in (GHMR().harmonize(pred, target, valid),
                     balanced_l1_loss(pred, target, reduction="sum")):
            grad, = torch.autograd.grad(loss, pred)
            assert torch.isfinite(loss) and bool(torch.isfinite(grad).all()), (seed, loss)
            cases += 1
    print(f"\nFUZZ overflow {dtype}: {cases} losses, all finite with finite gradients")
