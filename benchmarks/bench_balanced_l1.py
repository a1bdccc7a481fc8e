"""Benchmark: balanced L1 vs Detectron2's smooth L1, forward + backward, same process.

Prints median times and the ratio balanced_l1 / smooth_l1 for
  1. the element-wise losses (fvcore's smooth_l1_loss vs libraghm's balanced_l1_loss), and
  2. the whole dense box-regression loss as the heads call it (Detectron2's
     _dense_box_regression_loss with "smooth_l1", what the stock heads and LibraGHM's SmoothL1Loss
     call, vs LibraGHM's BalancedL1Loss module, what LibraGHM's heads call for "balanced_l1"),
     at ROI-head, RPN and RetinaNet sizes.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_balanced_l1.py [--device cuda] [--repeats 30]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "projects", "LibraGHM"))
from fvcore.nn import smooth_l1_loss  # noqa: E402
from detectron2.modeling.box_regression import (  # noqa: E402
    Box2BoxTransform,
    _dense_box_regression_loss,
)

from libraghm.losses import BalancedL1Loss, balanced_l1_loss  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats, warmup=5):
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def elementwise_case(n, device, repeats):
    g = torch.Generator().manual_seed(0)
    pred = (torch.randn(n, 4, generator=g) * 0.3).to(device).requires_grad_(True)
    target = (torch.randn(n, 4, generator=g) * 0.3).to(device)

    def sl1():
        smooth_l1_loss(pred, target, beta=0.11, reduction="sum").backward()

    def bl1():
        balanced_l1_loss(pred, target, beta=0.11, reduction="sum").backward()

    return median_time(sl1, device, repeats), median_time(bl1, device, repeats)


def dense_case(num_images, num_anchors, fg_fraction, device, repeats):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(num_anchors, 2, generator=g) * 600
    anchors = torch.cat([xy, xy + torch.rand(num_anchors, 2, generator=g) * 100 + 8], 1).to(device)
    gt = [(anchors + torch.randn(num_anchors, 4, generator=g).to(device) * 4) for _ in range(num_images)]
    gt = [torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 1)], 1) for b in gt]
    pred = (torch.randn(num_images, num_anchors, 4, generator=g) * 0.1).to(device).requires_grad_(True)
    fg = (torch.rand(num_images, num_anchors, generator=g) < fg_fraction).to(device)
    b2b = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    balanced = BalancedL1Loss(beta=0.11).to(device)

    def sl1():
        _dense_box_regression_loss([anchors], b2b, [pred], gt, fg, "smooth_l1", 0.11).backward()

    def bl1():
        balanced([anchors], b2b, [pred], gt, fg).backward()

    return median_time(sl1, device, repeats), median_time(bl1, device, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'case':62s} {'smooth_l1 ms':>13s} {'balanced_l1 ms':>15s} {'ratio':>7s}")
    for n in (512, 20_000, 200_000):
        s, b = elementwise_case(n, device, args.repeats)
        print(f"{'element-wise fwd+bwd, ' + str(n) + ' x 4':62s} {s:13.3f} {b:15.3f} {b / s:7.2f}")
    for label, (n_img, n_anchor, frac) in {
        "ROI head (1 x 1024 RoIs, 25% fg)": (1, 1024, 0.25),
        "RPN (2 imgs x 50k anchors, 128 fg/img)": (2, 50_000, 128 / 50_000),
        "RetinaNet (2 imgs x 100k anchors, 1% fg)": (2, 100_000, 0.01),
    }.items():
        s, b = dense_case(n_img, n_anchor, frac, device, args.repeats)
        print(f"{'dense loss fwd+bwd, ' + label:62s} {s:13.3f} {b:15.3f} {b / s:7.2f}")


if __name__ == "__main__":
    main()
