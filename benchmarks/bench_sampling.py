"""Per-image cost of LibraGHM's samplers against Detectron2's ``subsample_labels`` (same process).

Two realistic per-image problems, built with Detectron2's own parts:

- ROI heads: 2000 proposals (half scattered around the ground truths, half anywhere) plus the
  ground truths appended as proposals (20 by default), matched by ``Matcher([0.5], [0, 1])``,
  80 classes; sample 512 with positive fraction 0.25 (Detectron2's ROI-head defaults).
- RPN: the anchors of a standard FPN anchor generator (P2-P6, 3 aspect ratios; about 53k for a
  416x512 input), matched by ``Matcher([0.3, 0.7], [0, -1, 1])`` with low-quality matches;
  sample 256 with positive fraction 0.5 (Detectron2's RPN defaults).

Each sampler is called on the same labels and IoUs, alternating call by call with
``subsample_labels``; printed are the median time per call of both (thread CPU time on CPU, so
that other processes on a shared machine do not inflate it) and the median of the call-by-call
ratios. Target for the IoU-balanced sampler with the paper's defaults on the ROI-head problem:
at most ``TARGET`` (1.3x). The extra work of the heads that use an IoU-aware sampler
(``IoURecordingMatcher`` taking the max IoU per candidate) is timed the same way. The header and
the footer give the thread count and the machine's load average (other processes on a shared
machine still slow the measured thread down a little, through caches and memory bandwidth).

``--profile`` adds a per-operator breakdown (PyTorch profiler, self time per call, ROI-head
problem) of ``subsample_labels`` and of the IoU-balanced sampler. ``--stages`` adds where the
time of the IoU-balanced sampler (paper defaults, ROI-head problem) goes: a staged copy of its
compiled function, built from the library's own compiled parts, is timed with one more stage
each time (same method, median over ``--stage-runs`` runs); the last stage is checked to draw
exactly what the sampler draws.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py [--calls 400] [--num-gt 20]
        [--device cuda] [--profile] [--stages [--stage-runs 5]]
"""
import argparse
import os
import platform
import statistics
import sys
import time
from typing import Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "LibraGHM"))

from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator  # noqa: E402
from detectron2.modeling.matcher import Matcher  # noqa: E402
from detectron2.modeling.sampling import subsample_labels  # noqa: E402
from detectron2.structures import Boxes, pairwise_iou  # noqa: E402

from libraghm.sampling import (  # noqa: E402
    InstanceBalancedSampler,
    IoUBalancedSampler,
    RandomSampler,
)
from libraghm.sampling.base import split_candidates  # noqa: E402
from libraghm.sampling.grouped_ranking import CounterTable, counts_so_far  # noqa: E402
from libraghm.sampling.iou_balanced_sampler import (  # noqa: E402
    BinConstants,
    _iou_bins,
    _paper_constants,
)

#: Largest acceptable ratio IoU-balanced sampler (paper defaults) / subsample_labels, ROI heads.
TARGET = 1.3


def random_gt(num_gt, height, width, g, device):
    wh = 16 + torch.rand(num_gt, 2, generator=g) * torch.tensor([width / 2.0, height / 2.0])
    xy = torch.rand(num_gt, 2, generator=g) * (torch.tensor([width, height]) - wh)
    return torch.cat([xy, xy + wh], 1).to(device)


def roi_problem(num_proposals, num_gt, device, seed=0):
    """Labels / IoUs / matched GT of ``num_proposals`` RPN-like proposals + the GT boxes."""
    g = torch.Generator().manual_seed(seed)
    height, width = 800, 1216
    gt = random_gt(num_gt, height, width, g, "cpu")
    near = num_proposals // 2
    base = gt[torch.randint(num_gt, (near,), generator=g)]
    size = (base[:, 2:] - base[:, :2]).repeat(1, 2)
    jitter = (torch.rand(near, 4, generator=g) - 0.5) * size * torch.rand(near, 1, generator=g)
    around = base + jitter
    around[:, 2:] = torch.maximum(around[:, 2:], around[:, :2] + 4)
    anywhere = random_gt(num_proposals - near, height, width, g, "cpu")
    boxes = torch.cat([around, anywhere, gt]).to(device)  # GT appended, as Detectron2 does
    quality = pairwise_iou(Boxes(gt.to(device)), Boxes(boxes))
    matches, match_labels = Matcher([0.5], [0, 1])(quality)
    classes = torch.randint(80, (num_gt,), generator=g).to(device)
    labels = torch.where(match_labels == 0, 80, classes[matches])
    return dict(labels=labels, bg_label=80, ious=quality.amax(0), gt_index=matches,
                num_gt=num_gt, quality=quality, num_samples=512, positive_fraction=0.25)


def rpn_problem(num_gt, device, seed=0, height=416, width=512):
    """Anchor labels / IoUs / matched GT for a standard FPN anchor generator."""
    g = torch.Generator().manual_seed(seed)
    gen = DefaultAnchorGenerator(
        sizes=[[32], [64], [128], [256], [512]], aspect_ratios=[[0.5, 1.0, 2.0]],
        strides=[4, 8, 16, 32, 64], offset=0.0,
    )
    feats = [torch.zeros(1, 1, -(-height // s), -(-width // s), device=device)
             for s in (4, 8, 16, 32, 64)]
    anchors = Boxes.cat(gen(feats))
    gt = random_gt(num_gt, height, width, g, "cpu").to(device)
    quality = pairwise_iou(Boxes(gt), anchors)
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(quality)
    return dict(labels=labels, bg_label=0, ious=quality.amax(0), gt_index=matches,
                num_gt=num_gt, quality=quality, num_samples=256, positive_fraction=0.5)


def time_pair(baseline, candidate, calls, warmup, device):
    """
    Time ``baseline`` and ``candidate`` called alternately (so that both see the same machine
    state). On CPU the clock is the thread's CPU time, which other processes sharing the
    machine do not inflate; on CUDA, wall time with synchronisation.

    Returns:
        (float, float, float): median seconds per call of each, and the median of the
        call-by-call ratios candidate / baseline (robust to slow changes of machine load).
    """
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.thread_time
    times = ([], [])
    for i in range(warmup + calls):
        order = (0, 1) if i % 2 else (1, 0)
        for slot in order:
            fn = (baseline, candidate)[slot]
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[slot].append(clock() - start)
    ratios = [c / b for b, c in zip(*times) if b > 0]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def bench(title, p, calls, warmup, device):
    lab, bg, s, f = p["labels"], p["bg_label"], p["num_samples"], p["positive_fraction"]
    match = dict(ious=p["ious"], gt_index=p["gt_index"], num_gt=p["num_gt"])
    samplers = {
        "IoUBalancedSampler (paper)": IoUBalancedSampler(),
        "IoUBalancedSampler (MMDET_COMPAT)": IoUBalancedSampler(mmdet_compat=True),
        "IoUBalancedSampler, random positives": IoUBalancedSampler(positives="random"),
        "InstanceBalancedSampler": InstanceBalancedSampler(),
        "RandomSampler (= baseline)": RandomSampler(),
    }
    quality = p["quality"]
    fns = {name: (lambda smp: lambda: smp(lab, s, f, bg, **match))(sampler)
           for name, sampler in samplers.items()}
    fns["IoU record (max IoU per candidate)"] = lambda: quality.amax(0)
    n_pos = int(((lab != -1) & (lab != bg)).sum())
    n_neg = int((lab == bg).sum())
    print(f"\n{title}: {lab.numel()} candidates ({n_pos} positive, {n_neg} negative, "
          f"{p['num_gt']} GT), sample {s} (positive fraction {f}), device {device}")
    print(f"  {'':40s} {'subsample_labels':>16s} {'this':>10s} {'ratio':>7s}")
    ratios = {}
    for name, fn in fns.items():
        base, t, ratio = time_pair(lambda: subsample_labels(lab, s, f, bg), fn, calls, warmup,
                                   device)
        ratios[name] = ratio
        print(f"  {name:40s} {base * 1e6:13.1f} us {t * 1e6:7.1f} us {ratio:6.2f}x")
    return ratios["IoUBalancedSampler (paper)"]


def profile_ops(p, calls, device, top=25):
    """
    Per-operator self time per call (PyTorch profiler) of subsample_labels and of the
    IoU-balanced sampler (paper defaults). The profiler adds a little time to every operator,
    and its clock is wall time: read the relative sizes, on a quiet machine.
    """
    from torch.profiler import ProfilerActivity, profile

    lab, bg, s, f = p["labels"], p["bg_label"], p["num_samples"], p["positive_fraction"]
    match = dict(ious=p["ious"], gt_index=p["gt_index"], num_gt=p["num_gt"])
    sampler = IoUBalancedSampler()
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    for name, fn in [("subsample_labels", lambda: subsample_labels(lab, s, f, bg)),
                     ("IoUBalancedSampler (paper)", lambda: sampler(lab, s, f, bg, **match))]:
        for _ in range(50):
            fn()
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) / calls
        print(f"\n{name}: {total:.1f} us self CPU time per call in all, by operator "
              f"(calls per sampler call):")
        for e in events[:top]:
            print(f"  {e.key:34s} {e.self_cpu_time_total / calls:8.2f} us  "
                  f"x{e.count / calls:.0f}")


@torch.jit.script
def _paper_sampler_stages(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                          bg_label: int, ious: torch.Tensor, gt_index: torch.Tensor, num_gt: int,
                          num_bins: int, constants: Optional[BinConstants], box_words: int,
                          box_table: CounterTable, bin_words: int, bin_table: CounterTable,
                          field_mask: torch.Tensor,
                          stage: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The compiled work of ``IoUBalancedSampler()`` on an image where neither quota takes every
    candidate, stopped after ``stage`` (0-7; 8 = all of it). Same operations and draws, in the
    same order, as the library's ``_libra_sample``.
    """
    positive, negative, num_pos, num_neg = split_candidates(
        labels, num_samples, positive_fraction, bg_label
    )
    if stage == 0:
        return positive, negative
    pos_perm = torch.randperm(positive.numel(), device=labels.device)
    box_perm = torch.randperm(num_gt, device=labels.device)
    neg_perm = torch.randperm(negative.numel(), device=labels.device)
    if stage == 1:
        return pos_perm, neg_perm
    positive = positive.index_select(0, pos_perm)
    negative = negative.index_select(0, neg_perm)
    if stage == 2:
        return positive, negative
    box = box_perm.index_select(0, gt_index.index_select(0, positive))
    iou = ious.index_select(0, negative)
    if stage == 3:
        return box, iou
    low, high = torch.aminmax(iou)
    bins = _iou_bins(iou, low, high, num_bins, constants)
    if stage == 4:
        return box, bins
    neg_keys = torch.add(bins, counts_so_far(bins, bin_words, bin_table, field_mask),
                         alpha=num_bins)
    if stage == 5:
        return box, neg_keys
    pos_keys = torch.add(box, counts_so_far(box, box_words, box_table, field_mask), alpha=num_gt)
    if stage == 6:
        return pos_keys, neg_keys
    pos_idx = torch.topk(pos_keys, num_pos, largest=False, sorted=False)[1]
    neg_idx = torch.topk(neg_keys, num_neg, largest=False, sorted=False)[1]
    if stage == 7:
        return pos_idx, neg_idx
    return positive.index_select(0, pos_idx), negative.index_select(0, neg_idx)


STAGES = [
    "call, split into positives / negatives (2 nonzero)",
    "the three draws (randperm: positives, boxes, negatives)",
    "the two shuffles (2 gathers)",
    "box of each positive, IoU of each negative (3 gathers)",
    "IoU range and bins (aminmax, width, bins: 7 ops)",
    "rank within the IoU bins (1 word) and keys",
    "rank within the boxes (several words) and keys",
    "the two topk",
    "final gathers (= the sampler's compiled call)",
]
#: Stages every version that draws the same indices needs, in some form.
REQUIRED = (0, 1, 2, 7, 8)


def stage_breakdown(p, calls, warmup, device, runs):
    """
    Cumulative cost of the stages of the IoU-balanced sampler (paper defaults) in multiples of
    ``subsample_labels`` (median over ``runs`` runs of the median call-by-call ratio), the
    marginal cost of each, and the Python call around the compiled one.
    """
    lab, bg, s, f = p["labels"], p["bg_label"], p["num_samples"], p["positive_fraction"]
    match = dict(ious=p["ious"], gt_index=p["gt_index"], num_gt=p["num_gt"])
    sampler = IoUBalancedSampler()
    ious, gt_index, num_gt = p["ious"], p["gt_index"], p["num_gt"]
    constants = _paper_constants(num_gt, sampler.num_bins, lab.numel().bit_length(), lab.device,
                                 ious.dtype)
    args = (lab, s, f, bg, ious, gt_index, num_gt, sampler.num_bins) + constants

    torch.manual_seed(0)
    want = sampler(lab, s, f, bg, **match)
    torch.manual_seed(0)
    got = _paper_sampler_stages(*args, len(STAGES) - 1)
    if not (torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])):
        raise RuntimeError("the staged copy no longer draws what IoUBalancedSampler draws")

    fns = [(lambda st: lambda: _paper_sampler_stages(*args, st))(st) for st in range(len(STAGES))]
    fns.append(lambda: sampler(lab, s, f, bg, **match))
    ratios = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            ratios[i].append(time_pair(lambda: subsample_labels(lab, s, f, bg), fn, calls, warmup,
                                       device)[2])
    cum = [statistics.median(r) for r in ratios]
    print(f"\nWhere the time of IoUBalancedSampler (paper) goes, ROI heads, in multiples of "
          f"subsample_labels (median of {runs} runs):")
    print(f"  {'stage':58s} {'cumulative':>10s} {'marginal':>9s}")
    required = 0.0
    for i, name in enumerate(STAGES):
        marginal = cum[i] - (cum[i - 1] if i else 0.0)
        required += marginal if i in REQUIRED else 0.0
        mark = "*" if i in REQUIRED else " "
        print(f" {mark}{name:58s} {cum[i]:9.2f}x {marginal:+8.2f}x")
    print(f"  {'the Python call around the compiled one':58s} {cum[-1]:9.2f}x "
          f"{cum[-1] - cum[-2]:+8.2f}x")
    print(f"  (*) needed by any version that draws the same indices: {required:.2f}x in all")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400, help="timed calls per sampler")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls per sampler first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-gt", type=int, default=20,
                    help="GT boxes per image (default 20; the COCO mean is about 7)")
    ap.add_argument("--profile", action="store_true",
                    help="also print a per-operator breakdown (ROI-head problem)")
    ap.add_argument("--stages", action="store_true",
                    help="also print where the paper sampler's time goes (ROI-head problem)")
    ap.add_argument("--stage-runs", type=int, default=5, help="runs per stage with --stages")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{cpu_name()}, {os.cpu_count()} CPU(s), load average {load()}")
    roi = roi_problem(2000, args.num_gt, args.device)
    r1 = bench("ROI heads", roi, args.calls, args.warmup, args.device)
    r2 = bench("RPN", rpn_problem(args.num_gt, args.device), args.calls, args.warmup,
               args.device)
    if args.profile:
        profile_ops(roi, args.calls, args.device)
    if args.stages:
        stage_breakdown(roi, args.calls, args.warmup, args.device, args.stage_runs)
    verdict = "met" if r1 <= TARGET else "NOT met"
    print(f"\nIoU-balanced sampler (paper defaults) / subsample_labels: ROI heads {r1:.2f}x "
          f"(target <= {TARGET}x: {verdict}), RPN {r2:.2f}x. Load average at the end {load()}.")


def cpu_name():
    """The CPU model (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load():
    """The machine's 1, 5 and 15 minute load averages, as text."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
