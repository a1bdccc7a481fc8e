"""Benchmark: GHM-C / GHM-R and GHM RetinaNet against Detectron2's losses, same process.

Prints median wall times (forward + backward) and the ratios GHM / baseline for
  1. GHM-C vs fvcore's sigmoid_focal_loss_jit (what Detectron2's RetinaNet calls) on a
     RetinaNet-sized logits tensor (images x anchors x classes; default 2 x 100k x 80, ~1% ignored);
  2. GHM-R vs smooth L1 (beta 0) on the positives' deltas, and the dense form as the heads
     compute it (GHMR's forward in Detectron2's dense format: target deltas for every anchor, loss
     over the positives, vs Detectron2's _dense_box_regression_loss);
  3. the whole loss stage: LibraGHMRetinaNet.losses (MODEL.RETINANET.CLS_LOSS_TYPE ghm_c,
     BBOX_REG_LOSS_TYPE ghm_r) vs RetinaNet.losses on the same synthetic inputs;
  4. a full training step (forward, backward, SGD step) of that GHM RetinaNet vs stock RetinaNet
     with the Shapes base config (Base-Shapes-RetinaNet.yaml) on 2 rendered shapes images.
Targets (from the issue): GHM-C <= 1.5x focal loss, training step <= 1.05x. LibraGHM's statistics
logging (LIBRAGHM.LOG_PERIOD) is off in the timed models.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_ghm.py [--device cuda] [--repeats 7]
       [--step-repeats 21] [--anchors 100000] [--classes 80] [--threads 1] [--skip-step]
Each line shows the ratio of medians and, in brackets, the ratio of minima (on a shared CPU the
minima are the steadier estimate of the intrinsic cost).
"""
import argparse
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "LibraGHM"))

from fvcore.nn import sigmoid_focal_loss_jit, smooth_l1_loss  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from libraghm import add_libraghm_config  # noqa: E402
from libraghm.losses import GHMC, GHMR  # noqa: E402
from libraghm.losses.ghm_loss import encode_box_deltas  # noqa: E402

from _common import training_step  # noqa: E402


LAST_MINIMA = []


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_times(fns, device, repeats, warmup=2):
    """
    Median wall time (ms) of each function; the functions are run interleaved (ABAB...). The
    minimum of each is kept in ``LAST_MINIMA`` (less sensitive to other processes on a shared CPU).
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[i].append((time.perf_counter() - t0) * 1e3)
    LAST_MINIMA[:] = [min(t) for t in times]
    return [statistics.median(t) for t in times]


def report(name, base_name, t_base, t_ghm, target=None):
    """Print medians, the ratio of medians and (in brackets) the ratio of minima."""
    ratio = t_ghm / t_base
    ratio_min = LAST_MINIMA[1] / LAST_MINIMA[0]
    goal = ""
    if target is not None:
        goal = f"  (target <= {target:.2f}x: {'met' if ratio <= target else 'NOT met'})"
    print(
        f"{name:<46s} {base_name}: {t_base:9.2f} ms   GHM: {t_ghm:9.2f} ms   "
        f"ratio {ratio:5.2f}x [min {ratio_min:5.2f}x]{goal}"
    )
    return ratio


def dense_inputs(num_images, num_anchors, num_classes, device, seed=0):
    """Synthetic RetinaNet outputs and labels: ~1% positives, ~1% ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_images, num_anchors, num_classes, generator=g) - 4.0).to(device)
    u = torch.rand(num_images, num_anchors, generator=g)
    labels = torch.full((num_images, num_anchors), num_classes, dtype=torch.long)
    pos = u < 0.01
    labels[pos] = torch.randint(0, num_classes, (int(pos.sum()),), generator=g)
    labels[(u >= 0.01) & (u < 0.02)] = -1
    xy = torch.rand(num_anchors, 2, generator=g) * 700
    anchors = torch.cat([xy, xy + torch.rand(num_anchors, 2, generator=g) * 120 + 8], 1)
    gt = [anchors + torch.randn(num_anchors, 4, generator=g) * 4 for _ in range(num_images)]
    gt = [torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 1)], 1).to(device) for b in gt]
    deltas = (torch.randn(num_images, num_anchors, 4, generator=g) * 0.1).to(device)
    return logits, labels.to(device), anchors.to(device), gt, deltas


def bench_ghmc(args, device):
    logits, labels, _, _, _ = dense_inputs(2, args.anchors, args.classes, device)
    x = logits.requires_grad_(True)
    valid = labels >= 0
    targets = (labels.unsqueeze(-1) == torch.arange(args.classes, device=device)).to(x.dtype)
    ghmc = GHMC().to(device)

    def focal():  # as Detectron2's RetinaNet: valid anchors selected, then the focal loss
        loss = sigmoid_focal_loss_jit(
            x[valid], targets[valid], alpha=0.25, gamma=2.0, reduction="sum"
        )
        loss.backward()
        x.grad = None

    def ghm():  # as LibraGHMRetinaNet: all anchors, ignored ones masked
        ghmc(x, targets, valid).backward()
        x.grad = None

    t_f, t_g = median_times([focal, ghm], device, args.repeats)
    ratio = report(f"GHM-C vs focal loss, 2x{args.anchors}x{args.classes}", "focal", t_f, t_g, 1.5)

    xf = logits.reshape(-1, args.classes).clone().requires_grad_(True)
    tf = targets.reshape(-1, args.classes)
    ghmc2 = GHMC().to(device)

    def focal_plain():
        sigmoid_focal_loss_jit(xf, tf, alpha=0.25, gamma=2.0, reduction="sum").backward()
        xf.grad = None

    def ghm_plain():
        ghmc2.harmonize(xf, tf).backward()
        xf.grad = None

    t_f2, t_g2 = median_times([focal_plain, ghm_plain], device, args.repeats)
    report("  same, no ignored anchors (loss kernels only)", "focal", t_f2, t_g2)
    return ratio


def bench_ghmr(args, device):
    _, labels, anchors, gt, deltas = dense_inputs(2, args.anchors, args.classes, device)
    pos = (labels >= 0) & (labels != args.classes)
    from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss

    target = encode_box_deltas(anchors, torch.stack(gt), (1.0, 1.0, 1.0, 1.0))
    p_pos = deltas[pos].clone().requires_grad_(True)
    t_pos = target[pos]
    ghmr = GHMR().to(device)

    def sl1():
        smooth_l1_loss(p_pos, t_pos, beta=0.0, reduction="sum").backward()
        p_pos.grad = None

    def ghm():
        ghmr.harmonize(p_pos, t_pos).backward()
        p_pos.grad = None

    t_s, t_g = median_times([sl1, ghm], device, args.repeats * 3)
    report(f"GHM-R vs smooth L1, {int(pos.sum())} positives x 4", "smoothL1", t_s, t_g)

    pd = deltas.clone().requires_grad_(True)
    b2b = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    ghmr2 = GHMR().to(device)

    def sl1_dense():  # Detectron2's dense box loss (deltas of every anchor, loss over positives)
        _dense_box_regression_loss([anchors], b2b, [pd], gt, pos, "smooth_l1", 0.0).backward()
        pd.grad = None

    def ghm_dense():  # as LibraGHMRetinaNet (and any head with BBOX_REG_LOSS_TYPE ghm_r)
        ghmr2([anchors], b2b, [pd], gt, pos).backward()
        pd.grad = None

    t_s2, t_g2 = median_times([sl1_dense, ghm_dense], device, args.repeats)
    report(f"  dense form, 2x{args.anchors} anchors", "smoothL1", t_s2, t_g2)


#: The two models compared: stock RetinaNet (focal + smooth L1) and GHM RetinaNet.
MODELS = ("RetinaNet", "GHM RetinaNet")


def _cfg(name, num_classes=None):
    """Base-Shapes-RetinaNet.yaml as stock RetinaNet, or as LibraGHMRetinaNet with GHM-C + GHM-R."""
    cfg = get_cfg()
    add_libraghm_config(cfg)
    cfg.merge_from_file(
        os.path.join(REPO, "configs", "Shapes-Detection", "Base-Shapes-RetinaNet.yaml")
    )
    if name == "GHM RetinaNet":
        cfg.MODEL.META_ARCHITECTURE = "LibraGHMRetinaNet"
        cfg.MODEL.RETINANET.CLS_LOSS_TYPE = "ghm_c"
        cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "ghm_r"
    cfg.MODEL.WEIGHTS = ""
    # No statistics logging: the storage stays at iteration 0 here, so LIBRAGHM.LOG_PERIOD would
    # log (and synchronise) on every timed call instead of once per period.
    cfg.LIBRAGHM.LOG_PERIOD = 0
    if num_classes:
        cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    return cfg


def bench_loss_stage(args, device):
    """RetinaNet.losses vs LibraGHMRetinaNet.losses (focal + smooth L1 vs GHM-C + GHM-R)."""
    logits, labels, anchors, gt, deltas = dense_inputs(2, args.anchors, args.classes, device)
    models = []
    for name in MODELS:
        cfg = _cfg(name, args.classes)
        cfg.MODEL.DEVICE = device.type
        models.append(build_model(cfg).train())
    x = logits.requires_grad_(True)
    d = deltas.requires_grad_(True)
    # Two "levels" so the per-level split is exercised like in a real model.
    cut = args.anchors // 2
    anchor_list = [Boxes(anchors[:cut]), Boxes(anchors[cut:])]
    pl = [x[:, :cut], x[:, cut:]]
    pd = [d[:, :cut], d[:, cut:]]
    gl = list(labels)

    def run(model):
        def fn():
            losses = model.losses(anchor_list, pl, gl, pd, gt)
            sum(losses.values()).backward()
            x.grad = None
            d.grad = None
        return fn

    with EventStorage(0):
        t_s, t_g = median_times([run(models[0]), run(models[1])], device, args.repeats)
    report(f"loss stage (losses()), 2x{args.anchors}x{args.classes}", "RetinaNet", t_s, t_g)


def shapes_batch(num_images, height, width, device):
    import cv2
    import numpy as np
    from detectron2.structures import BitMasks

    from libraghm.data.shapes import _render_image

    batch = []
    for i in range(num_images):
        img, objects = _render_image(np.random.default_rng([99, i]))
        img = cv2.resize(img, (width, height))
        inst = Instances((height, width))
        masks = [
            cv2.resize(m.astype("uint8"), (width, height), interpolation=cv2.INTER_NEAREST)
            for _, m in objects
        ]
        keep = [j for j, m in enumerate(masks) if m.any()]
        bitmasks = BitMasks(torch.from_numpy(np.stack([masks[j] for j in keep])).bool())
        inst.gt_boxes = bitmasks.get_bounding_boxes()
        inst.gt_classes = torch.tensor([objects[j][0] for j in keep], dtype=torch.int64)
        image = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        batch.append({"image": image, "instances": inst})
    return batch


def bench_step(args, device):
    batch = shapes_batch(2, args.height, args.width, device)
    runs = []
    for name in MODELS:
        torch.manual_seed(0)
        cfg = _cfg(name)
        cfg.MODEL.DEVICE = device.type
        model = build_model(cfg).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        runs.append(functools.partial(training_step, model, opt, batch))
    with EventStorage(0):
        t_s, t_g = median_times(runs, device, args.step_repeats, warmup=3)
    name = f"training step, Shapes base config, 2x{args.height}x{args.width}"
    return report(name, "RetinaNet", t_s, t_g, 1.05)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--step-repeats", type=int, default=21)
    parser.add_argument("--anchors", type=int, default=100_000, help="anchors per image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--skip-step", action="store_true", help="skip the full training step")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"repeats={args.repeats} step_repeats={args.step_repeats}"
    )
    bench_ghmc(args, device)
    bench_ghmr(args, device)
    bench_loss_stage(args, device)
    if not args.skip_step:
        bench_step(args, device)


if __name__ == "__main__":
    main()
