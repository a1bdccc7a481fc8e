"""Balanced Feature Pyramid: training-step cost vs stock FPN, and the non-local refine's memory.

1. Step time. Builds the stock Shapes Faster R-CNN (``faster_rcnn_small_R_FPN.yaml``), the BFP one
   (``bfp_faster_rcnn.yaml``) and the full Libra R-CNN (``libra_faster_rcnn.yaml``: IoU-balanced
   sampler + BFP + balanced L1) - and the stock / BFP RetinaNet pair unless ``--no-retinanet`` -
   with the same seed, and times full training steps (forward, losses, backward, SGD step with
   lr 0 so that the workload stays the same) on the same batch of the built-in dataset,
   interleaving the models round by round. Prints medians and the ratios to stock (ratio of the
   medians, and median of the per-round ratios). Targets: full Libra model at most 1.15x the
   stock step (the paper reports about +6%).
2. Refine memory. In a fresh subprocess per measurement, runs the non-local refine block
   (C = ``--channels``, default 256 as in the COCO FPN) forward + backward on the reference level
   (stride 16) of two input sizes, and reports the peak resident memory it added (Linux VmHWM,
   reset through /proc/self/clear_refs just before; ru_maxrss-based where that is unavailable;
   glibc's mmap threshold pinned so that RSS follows live tensors, see ``--default-malloc``), for
   the two implementations of ``MODEL.BFP.ATTENTION``: "sdpa" (the default: PyTorch's
   scaled_dot_product_attention with scale=1.0, which on CPU dispatches to flash attention) and
   "materialized" (the plain HW x HW matrix). The ratio between the two sizes shows linear
   (~HW ratio) vs quadratic (~HW ratio squared) growth. With ``--device cuda`` the memory is
   ``torch.cuda.max_memory_allocated``.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bfp.py [--iters 15] [--images 4]
        [--sizes 800x1344 1600x2688] [--channels 256] [--device cuda] [--default-malloc]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from _common import (  # (also puts projects/LibraGHM on sys.path)
    add_step_args,
    load_cfg,
    per_round_ratio,
    time_training_steps,
)

# Models timed together, per architecture; "stock" is the baseline of the ratios.
GROUPS = {
    "faster_rcnn": {
        "stock": "Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
        "bfp": "Shapes-Detection/bfp_faster_rcnn.yaml",
        "libra": "Shapes-Detection/libra_faster_rcnn.yaml",
    },
    "retinanet": {
        "stock": "Shapes-Detection/retinanet_small_R_FPN.yaml",
        "bfp": "Shapes-Detection/bfp_retinanet.yaml",
    },
}
LABELS = {"stock": "stock FPN", "bfp": "BFP", "libra": "Libra (full)"}
IMPLS = ("sdpa", "materialized")  # MODEL.BFP.ATTENTION


# ---------------------------------------------------------------------------------------------
# Refine memory (child process)
# ---------------------------------------------------------------------------------------------
def _proc_kb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak():
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_kb("VmHWM") is not None
    except OSError:
        return False


def child_refine_memory(impl, hw, channels, device):
    """Peak extra memory (MiB) and time of one forward+backward of the non-local refine."""
    from libraghm.backbone.non_local import NonLocal2d

    torch.manual_seed(0)
    h, w = hw
    block = NonLocal2d(channels, attention=impl).to(device)
    torch.nn.init.normal_(block.conv_out.weight, std=0.01)
    # Warm up kernels on a tiny input so that one-off allocations do not count.
    tiny = torch.randn(1, channels, 4, 4, device=device, requires_grad=True)
    block(tiny).sum().backward()
    x = torch.randn(1, channels, h, w, device=device, requires_grad=True)
    block.zero_grad()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        exact = _reset_peak()
        base_kb = _proc_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    block(x).sum().backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        method = "torch.cuda.max_memory_allocated"
    else:
        peak_kb = _proc_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mib = (peak_kb - base_kb) / 1024
        method = "VmHWM (clear_refs reset)" if exact else "ru_maxrss"
    dt = time.perf_counter() - t0
    print(
        json.dumps(
            {"impl": impl, "hw": h * w, "peak_mib": peak_mib, "seconds": dt, "method": method}
        )
    )


def measure_refine(args):
    rows = []
    for size in args.sizes:
        ih, iw = (int(v) for v in size.lower().split("x"))
        hw = (-(-ih // 16), -(-iw // 16))  # reference level P4, stride 16
        for impl in IMPLS:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                impl,
                f"{hw[0]}x{hw[1]}",
                "--channels",
                str(args.channels),
                "--device",
                args.device,
            ]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            if not args.default_malloc:
                # Pin glibc's mmap threshold (128 KiB) so that every freed tensor goes back to the
                # OS and peak RSS tracks live tensors; with glibc's default dynamic threshold, freed
                # large blocks can stay in the heap and inflate RSS.
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["input"], r["ref_hw"] = size, hw
            rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------
# Step time
# ---------------------------------------------------------------------------------------------
def time_group(group, args):
    """
    Time the training steps of the models of ``GROUPS[group]`` on one batch, interleaved.

    Returns:
        dict[str, list[float]]: seconds per timed step, per model name.
        list[dict]: the batch.
        dict[str, int]: parameters of the BFP refine block, for the models that have one.
    """
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model

    import libraghm  # noqa: F401  (registers LibraGHM's parts)

    cfgs = {name: load_cfg(rel, args) for name, rel in GROUPS[group].items()}
    batch = next(iter(build_detection_train_loader(cfgs["stock"])))
    models, opts = {}, {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = build_model(cfg).train()
        # lr 0: the weights, hence the workload, stay the same from step to step.
        opts[name] = torch.optim.SGD(models[name].parameters(), lr=0.0, momentum=0.9)
    times = time_training_steps(models, opts, batch, args)
    refine_params = {
        name: sum(p.numel() for p in m.backbone.refine.parameters())
        for name, m in models.items()
        if hasattr(m.backbone, "refine")
    }
    return times, batch, refine_params


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(ap)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="measure refine memory with glibc's default (dynamic) mmap threshold",
    )
    ap.add_argument(
        "--sizes",
        nargs=2,
        default=["800x1344", "1600x2688"],
        help="two input sizes HxW for the refine-memory measurement",
    )
    ap.add_argument("--channels", type=int, default=256, help="channels of the refined feature")
    ap.add_argument("--no-retinanet", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "HxW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.child:
        impl, hw = args.child
        child_refine_memory(impl, tuple(int(v) for v in hw.split("x")), args.channels, args.device)
        return

    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s)")
    if not args.skip_timing:
        groups = ["faster_rcnn"] + ([] if args.no_retinanet else ["retinanet"])
        for group in groups:
            times, batch, refine_params = time_group(group, args)
            sizes = sorted({tuple(d["image"].shape[-2:]) for d in batch})
            print(
                f"\n[{group}] training step, {len(batch)} images {sizes}, {args.iters} steps each:"
            )
            med = {name: statistics.median(t) for name, t in times.items()}
            for name, t in times.items():
                line = (
                    f"  {LABELS[name]:<13}: median {med[name] * 1000:8.1f} ms   "
                    f"min {min(t) * 1000:8.1f} ms"
                )
                if name != "stock":
                    line += (
                        f"   / stock: {med[name] / med['stock']:.3f}x (medians), "
                        f"{per_round_ratio(times, name, 'stock'):.3f}x (per-round median)"
                    )
                if name in refine_params:
                    line += f"   (+{refine_params[name]} refine params)"
                print(line)
            if "libra" in times:
                print("  (target: full Libra model <= 1.15x stock; the paper reports about +6%)")

    if args.skip_memory:
        return
    rows = measure_refine(args)
    print(
        f"\n[refine memory] non-local block, C={args.channels}, forward+backward at the stride-16 "
        f"level, peak extra memory ({rows[0]['method']}):"
    )
    by = {(r["impl"], r["input"]): r for r in rows}
    s0, s1 = args.sizes
    hw0, hw1 = by[(IMPLS[0], s0)]["hw"], by[(IMPLS[0], s1)]["hw"]
    print(
        f"  {'impl':<13}{s0 + ' (HW=' + str(hw0) + ')':>24}{s1 + ' (HW=' + str(hw1) + ')':>24}"
        f"{'ratio':>9}"
    )
    for impl in IMPLS:
        a, b = by[(impl, s0)], by[(impl, s1)]
        print(
            f"  {impl:<13}{a['peak_mib']:>14.1f} MiB {a['seconds']:5.2f}s"
            f"{b['peak_mib']:>14.1f} MiB {b['seconds']:5.2f}s{b['peak_mib'] / max(a['peak_mib'], 1e-6):>8.2f}x"
        )
    print(
        f"  HW ratio {hw1 / hw0:.2f}x: linear growth ~{hw1 / hw0:.1f}x, quadratic ~{(hw1 / hw0) ** 2:.1f}x; "
        f"one HW x HW fp32 matrix: {hw0 * hw0 * 4 / 2**20:.1f} / {hw1 * hw1 * 4 / 2**20:.1f} MiB"
    )
    ratio_mat = by[("materialized", s1)]["peak_mib"] / max(by[("sdpa", s1)]["peak_mib"], 1e-6)
    print(f"  materialized / sdpa at {s1}: {ratio_mat:.1f}x")


if __name__ == "__main__":
    main()
