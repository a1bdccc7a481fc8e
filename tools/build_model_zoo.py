#!/usr/bin/env python
"""
Build the built-in-dataset model zoo: train every row, release its checkpoint, evaluate the release
back with ``train_net.py --eval-only`` and write the table of MODEL_ZOO.md.

    python tools/build_model_zoo.py                                    # every row
    python tools/build_model_zoo.py --only Shapes-Detection/libra_faster_rcnn.yaml

Per row (config ``Shapes-Detection/<cfg>.yaml``):
1. train with the shared schedule (``tools/compare_ap.py``'s command: ``--iters`` iterations, LR steps at
   75% / 90%, SEED 1) into output/model_zoo/train/<cfg>; a finished run there is reused;
2. measure s/iter and the training process's peak memory (RSS) in a short run of ``--measure-iters``
   iterations, one row after the other (so that the rows' speeds compare; see --measure-only);
3. release ``model_zoo/Shapes-Detection/<cfg>/model_final_<hash>.pth`` (+ config.yaml, metrics.json);
4. evaluate the release file with ``train_net.py --eval-only MODEL.WEIGHTS libraghm://...`` (COCOEvaluator
   on shapes_val) and check that it reproduces the AP measured at the end of training;
5. record it in ``libraghm/model_zoo/checkpoints.json`` and regenerate MODEL_ZOO.md's table.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "LibraGHM"))
sys.path.insert(0, os.path.join(REPO, "tools"))

from compare_ap import run_one  # noqa: E402
from libraghm.model_zoo.model_zoo import CHECKPOINTS_JSON  # noqa: E402
from libraghm.model_zoo.release import release_checkpoint  # noqa: E402

# (config, its stock baseline); the order of MODEL_ZOO.md's table.
ROWS = [
    ("Shapes-Detection/faster_rcnn_small_R_FPN.yaml", None),
    ("Shapes-Detection/libra_sampling_faster_rcnn.yaml", "Shapes-Detection/faster_rcnn_small_R_FPN.yaml"),
    ("Shapes-Detection/libra_sampling_rpn_faster_rcnn.yaml", "Shapes-Detection/faster_rcnn_small_R_FPN.yaml"),
    ("Shapes-Detection/ohem_faster_rcnn.yaml", "Shapes-Detection/faster_rcnn_small_R_FPN.yaml"),
    ("Shapes-Detection/ohem_mmdet_faster_rcnn.yaml", "Shapes-Detection/faster_rcnn_small_R_FPN.yaml"),
    ("Shapes-Detection/faster_rcnn_balanced_l1.yaml", "Shapes-Detection/faster_rcnn_small_R_FPN.yaml"),
    ("Shapes-Detection/bfp_faster_rcnn.yaml", "Shapes-Detection/faster_rcnn_small_R_FPN.yaml"),
    ("Shapes-Detection/bifpn_faster_rcnn.yaml", "Shapes-Detection/faster_rcnn_small_R_FPN.yaml"),
    ("Shapes-Detection/bifpn_gn_faster_rcnn.yaml", "Shapes-Detection/faster_rcnn_small_R_FPN.yaml"),
    ("Shapes-Detection/libra_faster_rcnn.yaml", "Shapes-Detection/faster_rcnn_small_R_FPN.yaml"),
    ("Shapes-Detection/retinanet_small_R_FPN.yaml", None),
    ("Shapes-Detection/ghm_retinanet.yaml", "Shapes-Detection/retinanet_small_R_FPN.yaml"),
    ("Shapes-Detection/retinanet_balanced_l1.yaml", "Shapes-Detection/retinanet_small_R_FPN.yaml"),
    ("Shapes-Detection/bfp_retinanet.yaml", "Shapes-Detection/retinanet_small_R_FPN.yaml"),
    ("Shapes-Detection/bifpn_retinanet.yaml", "Shapes-Detection/retinanet_small_R_FPN.yaml"),
    ("Shapes-Detection/libra_retinanet.yaml", "Shapes-Detection/retinanet_small_R_FPN.yaml"),
    ("Shapes-Detection/faster_rcnn_lite0_FPN.yaml", None),
    ("Shapes-Detection/retinanet_lite0_FPN.yaml", None),
    ("Shapes-Detection/efficientdet_lite0.yaml", "Shapes-Detection/retinanet_lite0_FPN.yaml"),
]
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TABLE_BEGIN, TABLE_END = "<!-- SHAPES-TABLE -->", "<!-- /SHAPES-TABLE -->"
README_BEGIN, README_END = "<!-- TABLE -->", "<!-- /TABLE -->"


def _stem(name):
    return os.path.splitext(os.path.basename(name))[0]


def release_dir(name):
    return os.path.join(REPO, "model_zoo", os.path.splitext(name)[0])


def _env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def measure_training(config, iters, threads):
    """
    Train ``config`` for ``iters`` iterations in a fresh ``train_net.py`` process.

    Returns:
        float: seconds per iteration (Detectron2's ``time``: the median over the last 20 iterations).
        float: peak resident memory (MiB) of the training process.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config,
               "OUTPUT_DIR", tmp, "SOLVER.MAX_ITER", str(iters), "DATASETS.TEST", "()", "SEED", "1"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(threads))
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"measurement run of {config} failed: {' '.join(cmd)}")
        rows = [json.loads(line) for line in open(os.path.join(tmp, "metrics.json"))]
    sec = [r["time"] for r in rows if "time" in r][-1]
    return sec, usage.ru_maxrss / 1024.0  # Linux reports KiB


def parse_evaluation(log):
    """(box AP dict, inference s/img) from the log of a Detectron2 evaluation."""
    lines = log.splitlines()
    ap, sec = None, None
    for i, line in enumerate(lines):
        if line.rstrip().endswith("copypaste: Task: bbox") and i + 2 < len(lines):
            keys = lines[i + 1].split("copypaste: ")[1].split(",")
            vals = [float(v) for v in lines[i + 2].split("copypaste: ")[1].split(",")]
            ap = dict(zip(keys, vals))
        m = re.search(r"Total inference pure compute time: .*\(([\d.]+) s / iter per device", line)
        if m:
            sec = float(m.group(1))
    return ap, sec


def evaluate_release(release_file, config_yaml, out_dir, threads):
    """Run ``train_net.py --eval-only`` on a release file; returns (box AP dict, s/img)."""
    rel = os.path.relpath(release_file, os.path.join(REPO, "model_zoo"))
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config_yaml, "--eval-only",
           "MODEL.WEIGHTS", "libraghm://" + rel, "OUTPUT_DIR", out_dir]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads))
    if res.returncode != 0:
        raise RuntimeError(f"evaluation of {release_file} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return parse_evaluation(res.stdout + res.stderr)


def build_row(name, a):
    config = os.path.join(REPO, "configs", name)
    train_dir = os.path.join(a.train_root, _stem(name))
    _, ev, full_run_sec = run_one(config, a.iters, a.train_root, a.threads, [])
    if ev is None:
        print(f"{name}: training failed, see {train_dir}/stdout.log", flush=True)
        return None
    train_ap = {k: ev["bbox/" + k] for k in AP_KEYS}
    sec_per_iter, mem = measure_training(config, a.measure_iters, a.threads)
    dest = release_dir(name)
    release = release_checkpoint(
        os.path.join(train_dir, "model_final.pth"), os.path.join(train_dir, "config.yaml"), dest
    )
    eval_ap, sec_per_img = evaluate_release(
        release, os.path.join(dest, "config.yaml"), os.path.join(a.eval_root, _stem(name)), a.threads
    )
    if eval_ap is None or abs(eval_ap["AP"] - train_ap["AP"]) > a.tolerance:
        raise RuntimeError(f"{name}: the release evaluates to {eval_ap}, training ended at {train_ap}")
    metrics = {
        "config": name,
        "iters": a.iters,
        "train_s_per_iter": sec_per_iter,
        "train_s_per_iter_full_run": full_run_sec,
        "inference_s_per_img": sec_per_img,
        "train_mem_mib": mem,
        "bbox": eval_ap,
        "bbox_at_end_of_training": train_ap,
        "checkpoint": os.path.relpath(release, os.path.join(REPO, "model_zoo")),
        "command": f"python tools/build_model_zoo.py --only {name}",
    }
    with open(os.path.join(dest, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"{name}: AP {eval_ap['AP']:.2f} (end of training {train_ap['AP']:.2f}), {release}", flush=True)
    return metrics


def remeasure_row(name, a):
    m = load_metrics(name)
    if m is None:
        return
    if "train_s_per_iter_full_run" not in m:
        m["train_s_per_iter_full_run"] = m["train_s_per_iter"]
    m["train_s_per_iter"], m["train_mem_mib"] = measure_training(os.path.join(REPO, "configs", name),
                                                                 a.measure_iters, a.threads)
    with open(os.path.join(release_dir(name), "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    print(f"{name}: {m['train_s_per_iter']:.3f} s/iter, {m['train_mem_mib']:.0f} MiB", flush=True)


def load_metrics(name):
    path = os.path.join(release_dir(name), "metrics.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def _delta_vs_baseline(m, baseline):
    """The row's box AP minus its baseline's, or "baseline" for a baseline row."""
    base = load_metrics(baseline) if baseline else None
    return f"{m['bbox']['AP'] - base['bbox']['AP']:+.1f}" if base else "baseline"


def markdown_table():
    head = ("| Name | iters | train s/iter | inference s/img | train mem (MiB) | box AP | Δ AP | id | download |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for name, baseline in ROWS:
        link = f"[{_stem(name)}](configs/{name})"
        m = load_metrics(name)
        if m is None:
            rows.append(f"| {link} | not built yet: `python tools/build_model_zoo.py --only {name}` ||||||||")
            continue
        delta = _delta_vs_baseline(m, baseline)
        ckpt = m["checkpoint"]
        ident = re.search(r"model_final_([0-9a-f]+)\.pth", ckpt).group(1)
        d = os.path.dirname(ckpt)
        rows.append(
            f"| {link} | {m['iters']} | {m['train_s_per_iter']:.2f} | {m['inference_s_per_img']:.3f} | "
            f"{m['train_mem_mib']:.0f} | {m['bbox']['AP']:.1f} | {delta} | {ident} | "
            f"[model](model_zoo/{ckpt}) \\| [metrics](model_zoo/{d}/metrics.json) |"
        )
    return "\n".join(rows)


def readme_table():
    """The README's short version: box AP and its difference to the baseline, per row."""
    rows = ["| model (Shapes config) | box AP | AP50 | AP75 | vs baseline |", "|---|---|---|---|---|"]
    for name, baseline in ROWS:
        m = load_metrics(name)
        if m is None:
            continue
        delta = _delta_vs_baseline(m, baseline)
        b = m["bbox"]
        rows.append(f"| [{_stem(name)}](configs/{name}) | {b['AP']:.1f} | {b['AP50']:.1f} | {b['AP75']:.1f} | {delta} |")
    return "\n".join(rows)


def _replace_between(path, begin, end, body):
    text = open(path).read()
    start, stop = text.index(begin) + len(begin), text.index(end)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + body + "\n" + text[stop:])


def write_outputs():
    released = {}
    for name, _ in ROWS:
        m = load_metrics(name)
        if m is not None:
            released[name] = m["checkpoint"]
    with open(CHECKPOINTS_JSON, "w") as f:
        json.dump(released, f, indent=1, sort_keys=True)
        f.write("\n")
    _replace_between(os.path.join(REPO, "MODEL_ZOO.md"), TABLE_BEGIN, TABLE_END, markdown_table())
    _replace_between(os.path.join(REPO, "README.md"), README_BEGIN, README_END, readme_table())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, help="configs (relative to configs/) to build")
    p.add_argument("--iters", type=int, default=1800)
    p.add_argument("--measure-iters", type=int, default=40, help="iterations of the speed/memory run")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest AP difference of the release")
    p.add_argument("--train-root", default=os.path.join(REPO, "output", "model_zoo", "train"))
    p.add_argument("--eval-root", default=os.path.join(REPO, "output", "model_zoo", "eval"))
    p.add_argument("--table-only", action="store_true", help="only regenerate the table and the catalog")
    p.add_argument("--measure-only", action="store_true", help="only redo the speed/memory runs of built rows")
    a = p.parse_args()
    names = [n for n, _ in ROWS]
    selected = names if a.only is None else [n if n.endswith(".yaml") else n + ".yaml" for n in a.only]
    unknown = [n for n in selected if n not in names]
    if unknown:
        p.error(f"unknown rows {unknown}; valid: {names}")
    for name in selected:
        if a.measure_only:
            remeasure_row(name, a)
        elif not a.table_only:
            build_row(name, a)
    write_outputs()
    print(markdown_table())


if __name__ == "__main__":
    main()
