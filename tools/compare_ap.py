#!/usr/bin/env python
"""
Train several configs on the built-in dataset with one shared schedule and tabulate COCO box AP.

    python tools/compare_ap.py --iters 600 --jobs 2 \
        configs/Shapes-Detection/faster_rcnn_small_R_FPN.yaml configs/Shapes-Detection/libra_sampling_faster_rcnn.yaml

Each config runs as its own ``train_net.py`` process (OUTPUT_DIR output/compare/<name>), evaluated with
COCOEvaluator on ``shapes_val``; the table (markdown) is printed and written to output/compare/results.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_evaluation(output_dir):
    """The last row of OUTPUT_DIR/metrics.json that holds COCO box AP, or None."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    rows = [json.loads(line) for line in open(path) if "bbox/AP" in line]
    return rows[-1] if rows else None


def run_one(config, iters, out_root, threads, extra):
    name = os.path.splitext(os.path.basename(config))[0]
    out = os.path.join(out_root, name)
    if last_evaluation(out) is None:
        steps = f"({int(iters * 0.75)}, {int(iters * 0.9)})"
        cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config,
               "OUTPUT_DIR", out, "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", steps,
               "SOLVER.CHECKPOINT_PERIOD", str(iters), "SEED", "1", *extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        os.makedirs(out, exist_ok=True)
        t0 = time.time()
        with open(os.path.join(out, "stdout.log"), "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            return name, None, time.time() - t0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    times = [r["time"] for r in rows if "time" in r]
    return name, last_evaluation(out), (sum(times) / len(times)) if times else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--jobs", type=int, default=2, help="configs trained at once (1 thread each if > 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: 2 // jobs)")
    p.add_argument("--out", default=os.path.join(REPO, "output", "compare"))
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # KEY VALUE overrides for every run
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    threads = a.threads or max(1, 2 // a.jobs)
    with ThreadPoolExecutor(a.jobs) as ex:
        results = list(ex.map(lambda c: run_one(c, a.iters, a.out, threads, extra), a.configs))
    lines = [f"| config ({a.iters} iters) | AP | AP50 | AP75 | APs | APm | APl | s/iter |", "|---" * 8 + "|"]
    for name, ev, sec in results:
        if ev is None:
            lines.append(f"| {name} | failed (see {a.out}/{name}/stdout.log) |||||||")
            continue
        vals = " | ".join(f"{ev['bbox/' + k]:.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
        lines.append(f"| {name} | {vals} | {sec:.2f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "results.md"), "a") as f:
        f.write(table + "\n\n")


if __name__ == "__main__":
    main()
