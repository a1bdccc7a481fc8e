"""Training-step cost of OHEM Faster R-CNN against stock Faster R-CNN (same process, same inputs).

Builds three models from the Shapes configs (``configs/Shapes-Detection/``): the stock
``StandardROIHeads`` baseline and ``LibraGHMROIHeads`` with ``MODEL.ROI_HEADS.SAMPLER:
OHEMSampler`` in its "paper" and "mmdet" modes (``MODEL.ROI_HEADS.OHEM.MODE``), with the same
weights, and times full training steps (forward, backward, SGD step) on the same batch of the
built-in dataset, interleaving the models round by round. Prints the median step time of each and
its ratio to the baseline (target: OHEM at most 1.3x), and the time OHEM spends in its read-only
box-head pass + selection (``LibraGHMROIHeads.hard_example_indices``).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ohem.py [--iters 15] [--device cuda]
"""

import argparse
import statistics
import time

import torch
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import StandardROIHeads

from _common import (  # (also puts projects/LibraGHM on sys.path)
    add_step_args,
    load_cfg,
    per_round_ratio,
    sync,
    time_training_steps,
)
import libraghm  # noqa: F401  (registers LibraGHM's parts)
from libraghm.modeling import LibraGHMROIHeads
from libraghm.sampling import OHEMSampler

# name: (config, overrides, expected ROI heads class, expected OHEM mode or None)
CONFIGS = {
    "stock": ("Shapes-Detection/faster_rcnn_small_R_FPN.yaml", [], StandardROIHeads, None),
    "ohem-paper": ("Shapes-Detection/ohem_faster_rcnn.yaml", [], LibraGHMROIHeads, "paper"),
    "ohem-mmdet": ("Shapes-Detection/ohem_mmdet_faster_rcnn.yaml", [], LibraGHMROIHeads, "mmdet"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(ap)
    args = ap.parse_args()
    torch.manual_seed(0)

    base = load_cfg(CONFIGS["stock"][0], args)
    batch = next(iter(build_detection_train_loader(base)))  # one real batch, reused by all models

    models, opts = {}, {}
    state = None
    for name, (rel, opts_list, heads_cls, mode) in CONFIGS.items():
        cfg = load_cfg(rel, args)
        cfg.merge_from_list(opts_list)
        torch.manual_seed(0)
        m = build_model(cfg)
        # What is timed is what the name says (the configs could drift).
        assert type(m.roi_heads) is heads_cls, (name, type(m.roi_heads))
        sampler = getattr(m.roi_heads, "sampler", None)
        assert (mode is None) == (not isinstance(sampler, OHEMSampler)), (name, sampler)
        assert mode is None or sampler.mode == mode, (name, sampler)
        if state is None:
            state = {k: v.clone() for k, v in m.state_dict().items()}
        m.load_state_dict(state)  # same weights for every model
        m.train()
        models[name] = m
        opts[name] = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    # time spent in OHEM's read-only pass + selection, per model (accumulated over timed steps)
    select_time = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync(args.device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(args.device)
            select_time[name].append(time.perf_counter() - t0)
            return out

        return wrapper

    for name, m in models.items():
        if isinstance(getattr(m.roi_heads, "sampler", None), OHEMSampler):
            select_time[name] = []
            m.roi_heads.hard_example_indices = timed(name, m.roi_heads.hard_example_indices)

    def clear_select_time():
        for v in select_time.values():
            v.clear()

    times = time_training_steps(models, opts, batch, args, after_warmup=clear_select_time)

    sizes = [tuple(d["image"].shape[1:]) for d in batch]
    print(
        f"device={args.device} threads={torch.get_num_threads()} images/step={len(batch)} "
        f"sizes={sizes} B/image={base.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE} "
        f"proposals/image={base.MODEL.RPN.POST_NMS_TOPK_TRAIN} iters={args.iters}"
    )
    ref = statistics.median(times["stock"])
    for name, t in times.items():
        med = statistics.median(t)
        paired = per_round_ratio(times, name, "stock")
        line = (
            f"{name:12s} median {med * 1000:8.1f} ms  min {min(t) * 1000:8.1f} ms  "
            f"ratio vs stock: medians {med / ref:5.3f}, mins {min(t) / min(times['stock']):5.3f}, "
            f"per-round median {paired:5.3f}"
        )
        if name in select_time:
            line += f"  (read-only pass + selection: {statistics.median(select_time[name]) * 1000:.1f} ms)"
        print(line)


if __name__ == "__main__":
    main()
