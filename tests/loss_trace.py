"""Step-by-step training losses of a config on fixed inputs: the redesign's "same numbers" oracle.

``trace_losses`` builds a model from a config (seeded), trains it for a few SGD steps on fixed
batches from the built-in dataset's renderer, single-threaded, and returns every loss of every step.
``tests/data/loss_traces.json`` holds the traces recorded with the implementation that predates
the composable redesign (commit 044f42c), one recording per CPU: float32 kernels differ in their
last bits between CPUs (vendor, vector width), and a few SGD steps amplify that. To record for
another CPU, run this harness against the old implementation::

    git worktree add /tmp/old 044f42c
    PYTHONPATH=/tmp/old/projects/LibraGHM python tests/loss_trace.py --record "<CPU name>"

``tests/test_redesign_numbers.py`` checks that today's classes give the same numbers.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from conftest import get_config, tiny_batch  # noqa: E402

TRACES = os.path.join(HERE, "data", "loss_traces.json")
STEPS = 4

# name -> (config relative to configs/, overrides). The traces were recorded with the implementation
# before the redesign; two defaults changed since and are pinned here to their old behaviour: GHM's
# bias correction (now off, as in the paper) and the BiFPN max-pool padding (now TensorFlow's SAME).
CASES = {
    "libra_faster_rcnn": ("Shapes-Detection/libra_faster_rcnn.yaml", []),
    "libra_sampling_rpn_faster_rcnn": ("Shapes-Detection/libra_sampling_rpn_faster_rcnn.yaml", []),
    "ohem_faster_rcnn": ("Shapes-Detection/ohem_faster_rcnn.yaml", []),
    "ohem_mmdet_faster_rcnn": ("Shapes-Detection/ohem_mmdet_faster_rcnn.yaml", []),
    "faster_rcnn_balanced_l1": ("Shapes-Detection/faster_rcnn_balanced_l1.yaml", []),
    "ghm_retinanet": ("Shapes-Detection/ghm_retinanet.yaml", [
        "MODEL.GHM_C.BIAS_CORRECTION", True, "MODEL.GHM_R.BIAS_CORRECTION", True]),
    "libra_retinanet": ("Shapes-Detection/libra_retinanet.yaml", []),
    "bifpn_retinanet": ("Shapes-Detection/bifpn_retinanet.yaml", [
        "MODEL.BIFPN.POOL_PADDING", "symmetric"]),
    "bifpn_faster_rcnn": ("Shapes-Detection/bifpn_faster_rcnn.yaml", [
        "MODEL.BIFPN.POOL_PADDING", "symmetric"]),
}


def trace_losses(config, opts=(), steps=STEPS, seed=3):
    """
    Args:
        config (str): config path relative to ``configs/``.
        opts (list): command-line style overrides.
        steps (int): SGD steps.
        seed (int): seed of the model's initialisation and of the sampling draws.

    Returns:
        list[dict[str, float]]: the loss dict of every step.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # TorchScript's profiling executor re-optimises scripted functions (fvcore's focal loss, the
    # samplers) after their first calls, which changes the last bits of their results: run them
    # unoptimised so that a trace does not depend on what ran before it in the process.
    try:
        with torch.jit.optimized_execution(False):
            return _trace(config, opts, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _trace(config, opts, steps, seed):
    cfg = get_config(config, *opts)
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    batches = [tiny_batch(2, seed=s) for s in range(2)]
    out = []
    with EventStorage(0) as storage:
        for step in range(steps):
            losses = model(batches[step % len(batches)])
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            storage.iter += 1
            out.append({k: float(v) for k, v in sorted(losses.items())})
    return out


def all_traces():
    """Every case, in order, as recorded (call it in a fresh process: TorchScript's state from
    earlier calls in a process changes the last bits of fvcore's scripted focal loss)."""
    return {name: trace_losses(config, opts) for name, (config, opts) in CASES.items()}


def cpu_name():
    """The CPU's model name and the vector instructions PyTorch's kernels use, e.g. "AMD EPYC, AVX512"."""
    name = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        name = names[0] if names else name
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--print"]:
        print(json.dumps(all_traces()))
        sys.exit(0)
    if len(sys.argv) != 3 or sys.argv[1] != "--record":
        sys.exit("usage: loss_trace.py --print | --record '<CPU name>'")
    recordings = {}
    if os.path.exists(TRACES):
        with open(TRACES) as f:
            recordings = json.load(f)
    recordings[sys.argv[2]] = all_traces()
    with open(TRACES, "w") as f:
        json.dump(recordings, f, indent=1, sort_keys=True)
