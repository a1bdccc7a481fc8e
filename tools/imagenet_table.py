#!/usr/bin/env python
"""
The ImageNet-regime results, row by row and seed by seed, resumable: every finished run is recorded in
``docs/results/imagenet_regime.json`` (committed), so a later session continues where the last stopped.

    python tools/imagenet_table.py --list                    # rows, seeds done / wanted
    python tools/imagenet_table.py --only ghm_retinanet --seeds 1 2 3
    python tools/imagenet_table.py                           # every missing (row, seed), in order
    python tools/imagenet_table.py --table                   # markdown: mean, std, runs per row
    python tools/imagenet_table.py --write-readme            # the rows run so far into README.md

Each run is one ``train_net.py`` process (``OUTPUT_DIR output/imagenet_table/<row>/seed<k>``, ``SEED k``,
``OMP_NUM_THREADS`` = ``--threads``), on the built-in dataset from the ImageNet EfficientNet-Lite0
weights, evaluated by COCOEvaluator on ``shapes_val``. Runs go one after another: never run two trainings
at once on a 2-core machine. A run that was interrupted restarts from scratch (its OUTPUT_DIR is
cleared); a finished one is never rerun unless ``--rerun``.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
from compare_ap import last_evaluation  # noqa: E402

RESULTS = os.path.join(REPO, "docs", "results", "imagenet_regime.json")
RETINA = "configs/Shapes-Detection/retinanet_lite0_FPN.yaml"
FRCNN = "configs/Shapes-Detection/faster_rcnn_lite0_FPN.yaml"
LIBRA_RETINA = ["MODEL.META_ARCHITECTURE", "LibraGHMRetinaNet"]
GHM_RECIPE = ["LIBRAGHM.CLIP_GRAD_NORM", "35.0"]  # GHM's published recipe: whole-model clipping at 35
# The Shapes configs use 4x Detectron2's linearly scaled LR (0.01 for 4 images); the GHM and RetinaNet papers'
# rate is 0.01 for 16 images.
PAPER_LR = ["SOLVER.BASE_LR", "0.0025"]
# GHM's authors: the warm-up "should be large enough" or neither focal loss nor GHM trains (mmdetection's
# GHM recipe: 500 iterations); the Shapes configs warm up for 100.
LONG_WARMUP = ["SOLVER.WARMUP_ITERS", "500"]
LIBRA_HEADS = ["MODEL.ROI_HEADS.NAME", "LibraGHMROIHeads"]
IOU_BALANCED = LIBRA_HEADS + ["MODEL.ROI_HEADS.SAMPLER", "IoUBalancedSampler"]
BALANCED_L1 = ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "balanced_l1"]
BFP_FRCNN = ["MODEL.BACKBONE.NAME", "build_bfp_backbone", "MODEL.BFP.FPN_BUILDER", "build_efficientnet_fpn_backbone",
             "MODEL.BFP.REFINE", "non_local"]
BFP_RETINA = ["MODEL.BACKBONE.NAME", "build_bfp_backbone",
              "MODEL.BFP.FPN_BUILDER", "build_efficientnet_retinanet_fpn_backbone", "MODEL.BFP.REFINE", "non_local"]
BIFPN = ["MODEL.BACKBONE.NAME", "build_bifpn_backbone", "MODEL.BIFPN.BOTTOM_UP", "build_efficientnet_backbone",
         "MODEL.BIFPN.WIDTH", "64", "MODEL.BIFPN.REPEATS", "3", "MODEL.BIFPN.SIZE_DIVISIBILITY", "32"]

#: row -> (config, overrides, what it is, its baseline row or None). A row shares its baseline's schedule.
ROWS = {
    "retinanet": (RETINA, [], "RetinaNet, focal loss + smooth L1", None),
    "ghm_c": (RETINA, LIBRA_RETINA + ["MODEL.RETINANET.CLS_LOSS_TYPE", "ghm_c"] + GHM_RECIPE,
              "GHM-C (paper) + smooth L1", "retinanet"),
    "focal_ghm_r": (RETINA, LIBRA_RETINA + ["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r"] + GHM_RECIPE,
                    "focal loss + GHM-R (paper, mu 0.02)", "retinanet"),
    "focal_ghm_r_mu0.2": (RETINA, LIBRA_RETINA + ["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r",
                                                  "MODEL.GHM_R.MU", "0.2"] + GHM_RECIPE,
                          "focal loss + GHM-R, mu 0.2", "retinanet"),
    "ghm_retinanet": (RETINA, LIBRA_RETINA + ["MODEL.RETINANET.CLS_LOSS_TYPE", "ghm_c",
                                              "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r"] + GHM_RECIPE,
                      "GHM RetinaNet: GHM-C + GHM-R (paper)", "retinanet"),
    "ghm_retinanet_mu0.2": (RETINA, LIBRA_RETINA + ["MODEL.RETINANET.CLS_LOSS_TYPE", "ghm_c",
                                                    "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r",
                                                    "MODEL.GHM_R.MU", "0.2"] + GHM_RECIPE,
                            "GHM-C + GHM-R with mu 0.2", "retinanet"),
    "ghm_c_maxw1": (RETINA, LIBRA_RETINA + ["MODEL.RETINANET.CLS_LOSS_TYPE", "ghm_c", "MODEL.GHM_C.MAX_WEIGHT", "1.0"]
                    + GHM_RECIPE, "GHM-C with harmonizing weights <= 1 (not in the paper) + smooth L1", "retinanet"),
    "ghm_c_maxw10": (RETINA, LIBRA_RETINA + ["MODEL.RETINANET.CLS_LOSS_TYPE", "ghm_c", "MODEL.GHM_C.MAX_WEIGHT", "10.0"]
                     + GHM_RECIPE, "GHM-C with harmonizing weights <= 10 (not in the paper) + smooth L1", "retinanet"),
    "ghm_retinanet_maxw1_mu0.2": (RETINA, LIBRA_RETINA + ["MODEL.RETINANET.CLS_LOSS_TYPE", "ghm_c",
                                                          "MODEL.GHM_C.MAX_WEIGHT", "1.0",
                                                          "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "ghm_r",
                                                          "MODEL.GHM_R.MU", "0.2"] + GHM_RECIPE,
                                  "GHM-C with weights <= 1 + GHM-R with mu 0.2", "retinanet"),
    "retinanet_lr0.0025": (RETINA, PAPER_LR, "RetinaNet at Detectron2's linearly scaled LR (0.0025 for 4 images)",
                           None),
    "ghm_c_lr0.0025": (RETINA, PAPER_LR + LIBRA_RETINA + ["MODEL.RETINANET.CLS_LOSS_TYPE", "ghm_c"] + GHM_RECIPE,
                       "GHM-C (paper) + smooth L1 at LR 0.0025", "retinanet_lr0.0025"),
    "retinanet_warmup500": (RETINA, LONG_WARMUP, "RetinaNet with a 500-iteration warm-up", None),
    "ghm_c_warmup500": (RETINA, LONG_WARMUP + LIBRA_RETINA + ["MODEL.RETINANET.CLS_LOSS_TYPE", "ghm_c"] + GHM_RECIPE,
                        "GHM-C (paper) + smooth L1, 500-iteration warm-up", "retinanet_warmup500"),
    "efficientdet_lite0": ("configs/Shapes-Detection/efficientdet_lite0.yaml", [],
                           "EfficientDet-Lite0 (same backbone weights, anchors, input, schedule)", "retinanet"),
    "libra_retinanet": (RETINA, LIBRA_RETINA + BFP_RETINA + ["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "balanced_l1",
                                                             "MODEL.BALANCED_L1.BETA", "0.11"],
                        "Libra RetinaNet: BFP + balanced L1 (beta 0.11)", "retinanet"),
    "bifpn_retinanet": (RETINA, BIFPN + ["MODEL.BIFPN.IN_FEATURES", "['res3', 'res4', 'res5']",
                                         "MODEL.BIFPN.TOP_LEVEL", "7"],
                        "RetinaNet with BiFPN (width 64, 3 layers) instead of FPN", "retinanet"),
    "faster_rcnn": (FRCNN, [], "Faster R-CNN (stock RPN: BCE on 128 sampled anchors per image)", None),
    "libra_sampling": (FRCNN, IOU_BALANCED, "IoU-balanced sampling (3 bins, instance-balanced positives)",
                       "faster_rcnn"),
    "bfp": (FRCNN, BFP_FRCNN, "Balanced Feature Pyramid (non-local refinement)", "faster_rcnn"),
    "balanced_l1": (FRCNN, LIBRA_HEADS + BALANCED_L1, "Balanced L1 (alpha 0.5, gamma 1.5, beta 1)",
                    "faster_rcnn"),
    "libra_rcnn": (FRCNN, IOU_BALANCED + BFP_FRCNN + BALANCED_L1, "Libra R-CNN: all three", "faster_rcnn"),
    "ohem": (FRCNN, LIBRA_HEADS + ["MODEL.ROI_HEADS.SAMPLER", "OHEMSampler", "MODEL.ROI_HEADS.OHEM.MODE", "paper"],
             "OHEM, paper mode (loss-ranked, NMS 0.7)", "faster_rcnn"),
    "ohem_mmdet": (FRCNN, LIBRA_HEADS + ["MODEL.ROI_HEADS.SAMPLER", "OHEMSampler",
                                         "MODEL.ROI_HEADS.OHEM.MODE", "mmdet"],
                   "OHEM, mmdetection mode", "faster_rcnn"),
    "bifpn_faster_rcnn": (FRCNN, BIFPN + ["MODEL.BIFPN.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']",
                                          "MODEL.BIFPN.TOP_LEVEL", "6"],
                          "Faster R-CNN with BiFPN (width 64, 3 layers) instead of FPN", "faster_rcnn"),
    "ghm_rpn": (FRCNN, ["MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.OBJECTNESS_LOSS_TYPE",
                        "ghm_c", "MODEL.RPN.SAMPLER", "NoSampling"] + GHM_RECIPE,
                "Faster R-CNN, GHM-C objectness on every valid anchor", "faster_rcnn"),
}


def load():
    if not os.path.isfile(RESULTS):
        return {}
    with open(RESULTS) as f:
        return json.load(f)


def save(results):
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")


def git_commit():
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip()


def run(row, seed, threads, out_root):
    config, opts, _, _ = ROWS[row]
    out = os.path.join(out_root, row, f"seed{seed}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", os.path.join(REPO, config),
           "OUTPUT_DIR", out, "SEED", str(seed), *opts]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    with open(os.path.join(out, "stdout.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    ev = last_evaluation(out)
    if rc != 0 or ev is None:
        raise SystemExit(f"{row} seed {seed} failed (exit {rc}); see {out}/stdout.log")
    return {"AP": ev["bbox/AP"], "AP50": ev["bbox/AP50"], "AP75": ev["bbox/AP75"],
            "minutes": round((time.time() - start) / 60, 1), "threads": threads, "commit": git_commit(),
            "command": " ".join(["train_net.py", "--config-file", config, "SEED", str(seed), *opts])}


README_BEGIN, README_END = "<!-- IMAGENET-TABLE -->", "<!-- /IMAGENET-TABLE -->"


def write_readme(results):
    """Put the rows that have runs between README.md's IMAGENET-TABLE markers."""
    lines = table(results).splitlines()
    text = "\n".join(lines[:2] + [line for line in lines[2:] if "| not run |" not in line])
    path = os.path.join(REPO, "README.md")
    with open(path) as f:
        readme = f.read()
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(head + README_BEGIN + "\n" + text + "\n" + README_END + tail)


def table(results):
    lines = ["| row | what | box AP (mean ± std) | vs baseline | seeds | per seed |", "|---|---|---|---|---|---|"]
    means = {}
    for row, (_, _, what, baseline) in ROWS.items():
        runs = results.get(row, {})
        # Detectron2 reports AP NaN when a model makes no detection above the score threshold: 0 here
        aps = [0.0 if math.isnan(runs[s]["AP"]) else runs[s]["AP"] for s in sorted(runs, key=int)]
        if not aps:
            lines.append(f"| {row} | {what} | not run | | 0 | |")
            continue
        means[row] = statistics.mean(aps)
        std = f" ± {statistics.stdev(aps):.1f}" if len(aps) > 1 else " (one seed)"
        delta = "baseline" if baseline is None else (
            f"{means[row] - means[baseline]:+.1f}" if baseline in means else "baseline not run")
        per = ", ".join(f"{s}: " + ("no detections" if math.isnan(runs[s]["AP"]) else f"{runs[s]['AP']:.1f}")
                        for s in sorted(runs, key=int))
        lines.append(f"| {row} | {what} | {means[row]:.1f}{std} | {delta} | {len(aps)} | {per} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-root", default=os.path.join(REPO, "output", "imagenet_table"))
    p.add_argument("--rerun", action="store_true", help="run again rows and seeds already recorded")
    p.add_argument("--list", action="store_true")
    p.add_argument("--table", action="store_true")
    p.add_argument("--write-readme", action="store_true", help="the rows run so far into README.md")
    args = p.parse_args()
    results = load()
    if args.write_readme:
        write_readme(results)
        return
    if args.list or args.table:
        if args.table:
            print(table(results))
        else:
            for row in ROWS:
                print(row, "done seeds:", sorted(results.get(row, {}), key=int))
        return
    for seed in args.seeds:  # seed-major: every row gets its first seed before any row its second
        for row in args.only:
            if str(seed) in results.get(row, {}) and not args.rerun:
                continue
            print(f"running {row} seed {seed} ...", flush=True)
            record = run(row, seed, args.threads, args.out_root)
            results = load()  # re-read: another invocation may have recorded rows meanwhile
            results.setdefault(row, {})[str(seed)] = record
            save(results)
            print(f"{row} seed {seed}: AP {record['AP']:.1f} ({record['minutes']} min)", flush=True)


if __name__ == "__main__":
    main()
