#!/usr/bin/env python
"""
Reproduce the papers' motivating figures from live LibraGHM training runs (what the models log to
Detectron2's EventStorage, see libraghm/events.py) and write them as PNG.

    python tools/paper_figures.py --iters 100 --out docs/figures

- Libra R-CNN, figure 2: IoU distribution of the sampled negatives under random sampling,
  IoU-balanced sampling and OHEM (hard negatives), and of all negative candidates. Three short
  Faster R-CNN runs on the built-in dataset from the same weights (--rcnn-init).
- GHM, figures 1 and 2: density of the classification gradient norm g = |p - p*| and the
  reformulated gradient norm of cross-entropy, focal loss and GHM-C, from a short GHM RetinaNet run
  (--retinanet-init); GHM-C's curve uses its live weights.

The data behind the figures is written to ``<out>/figures.json``. By default the runs start from the
released stock models (model zoo) when they exist, otherwise from scratch.
"""
import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "LibraGHM"))
sys.path.insert(0, REPO)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from libraghm import model_zoo  # noqa: E402
from libraghm.data import prepare_datasets  # noqa: E402
from libraghm.events import NEG_IOU_EDGES  # noqa: E402

NEG_IOU_RUNS = {
    # label -> (config, overrides, scalar prefix)
    "random sampling": ("libra_sampling_faster_rcnn", ["MODEL.ROI_HEADS.SAMPLER", "RandomSampler"],
                        "roi_head/neg_iou_hist"),
    "IoU-balanced sampling": ("libra_sampling_faster_rcnn", [], "roi_head/neg_iou_hist"),
    "hard negatives (OHEM)": ("ohem_faster_rcnn", [], "roi_head/neg_iou_hist"),
    "all negative candidates": ("ohem_faster_rcnn", [], "roi_head/cand_neg_iou_hist"),
}
TINY_OPTS = ["DATASETS.TRAIN", "('shapes_train_mini',)", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
             "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]


def _release_or_scratch(name):
    try:
        url = model_zoo.get_checkpoint_url(f"Shapes-Detection/{name}.yaml")
        from detectron2.utils.file_io import PathManager

        PathManager.get_local_path(url)
        return url
    except (RuntimeError, FileNotFoundError):
        return ""


def live_run(config, opts, iters, out_dir):
    """
    Train ``config`` for ``iters`` iterations with LIBRAGHM.LOG_PERIOD 1 in this process.

    Returns:
        EventStorage: the run's storage (all logged scalars, every iteration).
    """
    from train_net import Trainer

    cfg = model_zoo.get_config(f"Shapes-Detection/{config}.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", str(iters), "SOLVER.CHECKPOINT_PERIOD", "1000000",
                         "DATASETS.TEST", "()", "LIBRAGHM.LOG_PERIOD", "1", "OUTPUT_DIR", out_dir, "SEED", "1", *opts])
    cfg.freeze()
    os.makedirs(out_dir, exist_ok=True)
    seed_all_rng(cfg.SEED)  # as default_setup does: every run starts from the same weights and data order
    prepare_datasets(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer.storage


def mean_histogram(storage, prefix, names):
    """Per bin, the mean over the logged iterations of the fraction in that bin."""
    hists = np.array([[v for v, _ in storage.history(f"{prefix}/{n}").values()] for n in names])
    return hists.mean(axis=1)


def negative_iou_histograms(iters, init, out_dir, extra_opts=()):
    """
    Returns:
        dict: label -> list of the fraction of negatives per bin of NEG_IOU_EDGES.
    """
    names = [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(NEG_IOU_EDGES[:-1], NEG_IOU_EDGES[1:])]
    storages, result = {}, {}
    for label, (config, opts, prefix) in NEG_IOU_RUNS.items():
        key = (config, tuple(opts))
        if key not in storages:
            run_dir = os.path.join(out_dir, "runs", config + ("_" + opts[-1] if opts else ""))
            storages[key] = live_run(config, ["MODEL.WEIGHTS", init, *opts, *extra_opts], iters, run_dir)
        result[label] = mean_histogram(storages[key], prefix, names).tolist()
    return result


def gradient_norm_statistics(iters, init, out_dir, extra_opts=()):
    """
    Returns:
        dict: "edges" (bins + 1), "fraction" (mean fraction of samples per bin of g) and "beta" (GHM-C's
        weight per bin, mean over the run) of the classification logits of GHM RetinaNet.
    """
    storage = live_run("ghm_retinanet", ["MODEL.WEIGHTS", init, *extra_opts], iters,
                       os.path.join(out_dir, "runs", "ghm_retinanet"))
    bins = len([k for k in storage.histories() if k.startswith("ghm_c/g_hist/")])
    names = [f"{k:02d}" for k in range(bins)]
    return {
        "edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
        "fraction": mean_histogram(storage, "ghm_c/g_hist", names).tolist(),
        "beta": mean_histogram(storage, "ghm_c/beta", names).tolist(),
    }


def reweighted_gradient_norms(g, gamma=2.0, fraction=None):
    """
    The norm of d loss / d x as a function of the BCE gradient norm g = |p - p*|.

    Args:
        g (ndarray): gradient norms in (0, 1).
        gamma (float): the focal loss's gamma.
        fraction (ndarray or None): fraction of samples per bin of g (its bins equal on [0, 1]); gives
            the GHM-C curve ``g * beta(g)`` with ``beta = 1 / (M * fraction)``.

    Returns:
        dict: "cross-entropy" g; "focal loss" ``g^gamma * (g - gamma * (1 - g) * ln(1 - g))`` (alpha
        left out); "GHM-C" when ``fraction`` is given (NaN in empty bins).
    """
    out = {
        "cross-entropy": g,
        "focal loss": g**gamma * (g - gamma * (1.0 - g) * np.log1p(-g)),
    }
    if fraction is not None:
        fraction = np.asarray(fraction, dtype=np.float64)
        m = fraction.size
        idx = np.clip((g * m).astype(int), 0, m - 1)
        with np.errstate(divide="ignore"):
            beta = np.where(fraction > 0, 1.0 / (m * fraction), np.nan)
        out["GHM-C"] = g * beta[idx]
    return out


def plot_negative_ious(hists, path):
    centers = np.array(NEG_IOU_EDGES[:-1]) + 0.025
    width = 0.05 / (len(hists) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, h) in enumerate(hists.items()):
        ax.bar(centers - 0.025 + (i + 0.5) * width + width / 2, np.array(h) * 100, width, label=label)
    ax.set_xlabel("IoU of the negative with its best ground truth")
    ax.set_ylabel("share of negatives (%)")
    ax.set_xticks(NEG_IOU_EDGES)
    ax.set_title("IoU distribution of negatives (Libra R-CNN, fig. 2), live runs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gradient_density(stats, path):
    edges = np.array(stats["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    frac = np.array(stats["fraction"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(centers[frac > 0], frac[frac > 0], "o-")
    ax.set_xlabel("gradient norm g = |p - p*|")
    ax.set_ylabel("fraction of samples")
    ax.set_title("Gradient norm distribution (GHM, fig. 1), live run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reweighting(stats, path):
    g = np.linspace(0.005, 0.995, 199)
    curves = reweighted_gradient_norms(g, fraction=stats["fraction"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, y in curves.items():
        ax.semilogy(g, y, label=label)
    ax.set_xlabel("original gradient norm g")
    ax.set_ylabel("reformulated gradient norm")
    ax.set_title("Reweighting of CE, focal loss and GHM-C (GHM, fig. 2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=100, help="iterations of every live run")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "figures"))
    p.add_argument("--rcnn-init", default=None, help="weights of the Faster R-CNN runs ('' = scratch; default: "
                   "the released stock Faster R-CNN if present)")
    p.add_argument("--retinanet-init", default=None, help="weights of the GHM RetinaNet run (default: the "
                   "released stock RetinaNet if present)")
    p.add_argument("--work-dir", default=os.path.join(REPO, "output", "figures"), help="the runs' OUTPUT_DIRs")
    p.add_argument("--tiny", action="store_true", help="mini split, small images (a quick check)")
    a = p.parse_args(argv)
    setup_logger(name="detectron2")
    rcnn_init = _release_or_scratch("faster_rcnn_small_R_FPN") if a.rcnn_init is None else a.rcnn_init
    retina_init = _release_or_scratch("retinanet_small_R_FPN") if a.retinanet_init is None else a.retinanet_init
    extra = TINY_OPTS if a.tiny else []
    os.makedirs(a.out, exist_ok=True)
    hists = negative_iou_histograms(a.iters, rcnn_init, a.work_dir, extra)
    stats = gradient_norm_statistics(a.iters, retina_init, a.work_dir, extra)
    data = {
        "iters": a.iters,
        "rcnn_init": rcnn_init,
        "retinanet_init": retina_init,
        "neg_iou_edges": NEG_IOU_EDGES,
        "neg_iou_hist": hists,
        "gradient_norm": stats,
        "share_of_negatives_above_0.05": {k: float(sum(v[1:])) for k, v in hists.items()},
    }
    with open(os.path.join(a.out, "figures.json"), "w") as f:
        json.dump(data, f, indent=1)
    plot_negative_ious(hists, os.path.join(a.out, "libra_negative_iou.png"))
    plot_gradient_density(stats, os.path.join(a.out, "ghm_gradient_density.png"))
    plot_reweighting(stats, os.path.join(a.out, "ghm_reweighting.png"))
    for k, v in data["share_of_negatives_above_0.05"].items():
        print(f"{k}: {100 * v:.1f}% of negatives have IoU > 0.05")
    print(f"wrote {a.out}/libra_negative_iou.png, ghm_gradient_density.png, ghm_reweighting.png, figures.json")
    return data


if __name__ == "__main__":
    main()
