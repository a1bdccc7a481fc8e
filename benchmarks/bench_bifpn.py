"""Benchmark: a BiFPN neck's forward + backward against Detectron2's FPN at equal width.

Both necks take the same bottom-up features (random tensors with ResNet-50's channels, given to both
through one fixed-feature "bottom-up"), so only the pyramid is timed. Every setting prints the
median time of N forward + backward passes of each and the median of the paired ratios BiFPN / FPN
(the two necks alternate, so load from other processes hits both alike). Detectron2's FPN is timed
as its RetinaNet / Faster R-CNN builders make it (no norm; P6/P7 from stride-2 convs, or P6 by
subsampling). The BiFPN runs with its defaults (fast fusion, separable convs, BN, TensorFlow "SAME"
max-pool padding, i.e. ``MODEL.BIFPN.POOL_PADDING: same``) unless a row says otherwise.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_bifpn.py [--size 256] [--batch 2] [--iters 8]
        [--device cpu|cuda]
"""

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "LibraGHM"))

from detectron2.modeling.backbone import Backbone  # noqa: E402
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7  # noqa: E402

from libraghm.backbone.bifpn import BiFPN  # noqa: E402

R50 = {"res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}


class FixedFeatures(Backbone):
    """A 'bottom-up' that returns the feature dict it is called with (both necks get the same)."""

    def __init__(self, names):
        super().__init__()
        self._out_features = list(names)
        self._out_feature_channels = {n: R50[n][0] for n in names}
        self._out_feature_strides = {n: R50[n][1] for n in names}

    def forward(self, feats):
        return feats


def make_features(names, batch, size, device):
    return {
        n: torch.randn(
            batch,
            R50[n][0],
            size // R50[n][1],
            size // R50[n][1],
            device=device,
            requires_grad=True,
        )
        for n in names
    }


def fwd_bwd_seconds(model, feats, device):
    """Seconds of one forward + backward (sum of the outputs' means as the loss)."""
    for p in list(model.parameters()) + list(feats.values()):
        p.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(feats)
    loss = sum(o.float().mean() for o in out.values())
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def paired_timing(base, other, feats, iters, warmup, device):
    """
    Alternate the two models (base, other, base, other, ...) so that load from other processes hits
    both alike. Returns (median base s, median other s, median of the per-pair ratios other / base).
    """
    tb, to = [], []
    for i in range(warmup + iters):
        b = fwd_bwd_seconds(base, feats, device)
        o = fwd_bwd_seconds(other, feats, device)
        if i >= warmup:
            tb.append(b)
            to.append(o)
    ratios = [o / b for b, o in zip(tb, to)]
    return statistics.median(tb), statistics.median(to), statistics.median(ratios)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size", type=int, default=256, help="square image side the features come from"
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"{args.batch} x {args.size}x{args.size} images, ResNet-50 channels, median of {args.iters}"
    )

    retina_in, rcnn_in = ["res3", "res4", "res5"], ["res2", "res3", "res4", "res5"]
    settings = [
        # (label, in_features, top level, width, BiFPN kwargs)
        ("P3-P7 W=64  (D0: 3 repeats)", retina_in, 7, 64, dict(repeats=3)),
        ("P3-P7 W=64  1 repeat", retina_in, 7, 64, dict(repeats=1)),
        ("P3-P7 W=64  3 rep, softmax fusion", retina_in, 7, 64, dict(repeats=3, fusion="softmax")),
        ("P3-P7 W=64  3 rep, sum fusion", retina_in, 7, 64, dict(repeats=3, fusion="sum")),
        ("P3-P7 W=64  3 rep, regular 3x3", retina_in, 7, 64, dict(repeats=3, separable_conv=False)),
        ("P3-P7 W=64  3 rep, symmetric pool pad", retina_in, 7, 64,
         dict(repeats=3, pool_padding="symmetric")),
        ("P3-P7 W=256 3 repeats (COCO cfg)", retina_in, 7, 256, dict(repeats=3)),
        ("P2-P6 W=256 3 repeats (COCO cfg)", rcnn_in, 6, 256, dict(repeats=3)),
    ]
    header = (
        f"{'setting':38s} {'FPN ms':>8s} {'BiFPN ms':>9s} {'ratio':>6s} {'FPN params':>11s} "
        f"{'BiFPN params':>13s}"
    )
    print(header)
    print("-" * len(header))
    for label, in_features, top, width, kw in settings:
        src = FixedFeatures(in_features)
        feats = make_features(in_features, args.batch, args.size, args.device)
        top_block = LastLevelP6P7(2048, width) if top == 7 else LastLevelMaxPool()
        fpn = FPN(src, in_features, width, norm="", top_block=top_block).to(args.device).train()
        bifpn = BiFPN(src, in_features, top, width=width, **kw).to(args.device).train()
        t_fpn, t_bi, ratio = paired_timing(fpn, bifpn, feats, args.iters, args.warmup, args.device)
        p_fpn = n_params(fpn)
        print(
            f"{label:38s} {t_fpn * 1e3:8.1f} {t_bi * 1e3:9.1f} {ratio:6.2f} "
            f"{p_fpn:11,d} {n_params(bifpn):13,d}"
        )


if __name__ == "__main__":
    main()
