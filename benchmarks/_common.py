"""Helpers shared by the training-step benchmarks (``bench_bfp.py``, ``bench_ohem.py``).

They time full training steps (forward, losses, backward, optimizer step) of several models on one
batch, in one process, interleaving the models round by round so that load drift on a shared
machine hits every model alike. Importing this module puts ``projects/LibraGHM`` on ``sys.path``.
"""

import math
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "LibraGHM"))

__all__ = [
    "REPO",
    "add_step_args",
    "load_cfg",
    "sync",
    "training_step",
    "time_interleaved",
    "time_training_steps",
    "per_round_ratio",
]


def add_step_args(parser):
    """
    Add the options :func:`load_cfg` and :func:`time_interleaved` use: ``--iters``, ``--warmup``,
    ``--images``, ``--dataset``, ``--device``.

    Args:
        parser (argparse.ArgumentParser): the benchmark's parser.
    """
    parser.add_argument("--iters", type=int, default=15, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument(
        "--images", type=int, default=0, help="images per step (0: the config's)"
    )
    parser.add_argument("--dataset", default="shapes_train_mini")
    parser.add_argument("--device", default="cpu")


def load_cfg(rel, args):
    """
    Args:
        rel (str): config path relative to ``configs/``.
        args (argparse.Namespace): with ``device``, ``dataset`` and ``images`` (0: the config's
            SOLVER.IMS_PER_BATCH).

    Returns:
        CfgNode: the config with LibraGHM's keys, on ``args.device``, training on ``args.dataset``
        with no data-loader workers.
    """
    from detectron2.config import get_cfg
    from libraghm import add_libraghm_config

    cfg = get_cfg()
    add_libraghm_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", rel))
    cfg.MODEL.DEVICE = args.device
    cfg.DATASETS.TRAIN = (args.dataset,)
    cfg.DATALOADER.NUM_WORKERS = 0
    if args.images > 0:
        cfg.SOLVER.IMS_PER_BATCH = args.images
    return cfg


def sync(device):
    """Wait for the device's queued work (CUDA only; a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training_step(model, optimizer, batch):
    """
    One training step: zero the gradients, forward (losses), backward, optimizer step.

    Returns:
        Tensor: the total loss (detached).
    """
    optimizer.zero_grad(set_to_none=True)
    losses = model(batch)
    total = sum(losses.values())
    total.backward()
    optimizer.step()
    return total.detach()


def time_interleaved(step, names, iters, warmup, device, after_warmup=None):
    """
    Time ``step(name)`` for every name, round by round: ``warmup`` untimed rounds, then ``iters``
    timed ones (device synchronised before and after each step). Runs inside an
    ``EventStorage``, as Detectron2's models need one in training mode.

    Args:
        step (callable): ``step(name)`` runs one step of that model and returns its loss (or None).
        names (list[str]): the models, in the order they run in each round.
        iters (int): timed rounds.
        warmup (int): untimed rounds first.
        device (str): the models' device.
        after_warmup (callable or None): called once between the warm-up and the timed rounds.

    Returns:
        dict[str, list[float]]: seconds of each timed step, per name.

    Raises:
        FloatingPointError: a timed step returned a non-finite loss.
    """
    from detectron2.utils.events import EventStorage

    times = {name: [] for name in names}
    with EventStorage():
        for _ in range(warmup):
            for name in names:
                step(name)
        if after_warmup is not None:
            after_warmup()
        for _ in range(iters):
            for name in names:
                sync(device)
                t0 = time.perf_counter()
                loss = step(name)
                sync(device)
                times[name].append(time.perf_counter() - t0)
                if loss is not None and not math.isfinite(float(loss)):
                    raise FloatingPointError(f"{name}: non-finite loss {float(loss)}")
    return times


def time_training_steps(models, optimizers, batch, args, after_warmup=None):
    """
    :func:`time_interleaved` of :func:`training_step` on one shared batch for every model.

    Args:
        models (dict[str, nn.Module]): the models, in training mode.
        optimizers (dict[str, Optimizer]): one per model, same keys.
        batch (list[dict]): Detectron2 training inputs.
        args (Namespace): with ``iters``, ``warmup`` and ``device`` (see :func:`add_step_args`).
        after_warmup (callable or None): as in :func:`time_interleaved`.

    Returns:
        dict[str, list[float]]: seconds of each timed step, per model.
    """
    return time_interleaved(
        lambda name: training_step(models[name], optimizers[name], batch),
        list(models),
        args.iters,
        args.warmup,
        args.device,
        after_warmup=after_warmup,
    )


def per_round_ratio(times, name, ref):
    """
    Median over rounds of ``times[name][i] / times[ref][i]``: the two steps of a round run back to
    back, so this is robust to load that drifts during the run.
    """
    return statistics.median(a / b for a, b in zip(times[name], times[ref]))
