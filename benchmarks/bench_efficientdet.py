"""LibraGHM's EfficientDet against the ``effdet`` package's (same architecture), in one process.

For EfficientDet-Lite0 (320 x 320) and D0 (512 x 512), both with random weights and 90 classes:

- a training step of the whole detector: forward, anchor labelling, losses, backward and an SGD
  step over every parameter (backbone included: LibraGHM's backbone is built with ``NORM: BN``,
  ``FREEZE_AT: 0``, like effdet's), on the same ``--images`` images and boxes;
- the network alone (backbone, BiFPN, head: forward and backward of the sum of the outputs), to
  separate its cost from anchor labelling and losses;
- inference (pre-processing, network, decoding, NMS) of the same images.

The two implementations are called alternately, call by call (LibraGHM first in each round); the
table gives the median wall time of each and the median of the round-by-round ratios LibraGHM /
effdet, which is robust to load that drifts during the run on a shared machine. The last line is
LibraGHM's Lite0 inference time per 320 x 320 image (batch of 1). Header and footer give the thread
count and the load average.

Inputs: LibraGHM's model takes the images in 0..255 and normalises them itself (and pads them to a
multiple of 32; 320 and 512 need no padding); effdet's takes them normalised. The boxes are drawn
once per image (5 per image, 8..160 px) and given to both (effdet: yxyx, classes from 1).

``effdet`` is a benchmark-only requirement (``requirements.txt``); the tests do not import it.

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_efficientdet.py [--iters 5] [--images 4]
"""
import argparse
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import per_round_ratio, time_interleaved  # noqa: E402

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from libraghm import add_libraghm_config  # noqa: E402
from libraghm.modeling import apply_efficientdet_preset  # noqa: E402

NUM_CLASSES = 90
MODELS = {"Lite0": ("tf_efficientdet_lite0", 320), "D0": ("tf_efficientdet_d0", 512)}


def libraghm_model(preset):
    cfg = add_libraghm_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "EfficientDet"
    cfg.MODEL.EFFICIENTDET.PRESET = preset
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.DEVICE = "cpu"
    apply_efficientdet_preset(cfg)
    cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    cfg.MODEL.EFFICIENTNET.NORM = "BN"  # train every BN, as effdet does
    cfg.MODEL.EFFICIENTNET.FREEZE_AT = 0
    cfg.LIBRAGHM.LOG_PERIOD = 0  # no training statistics (every step would log: iteration 0)
    return build_model(cfg), cfg


def effdet_models(name):
    from effdet import create_model

    train = create_model(name, bench_task="train", bench_labeler=True, pretrained=False,
                         pretrained_backbone=False,
                         num_classes=NUM_CLASSES)
    predict = create_model(name, bench_task="predict", pretrained=False,
                           pretrained_backbone=False, num_classes=NUM_CLASSES)
    predict.model.load_state_dict(train.model.state_dict())
    return train, predict


def random_boxes(num_images, size, g):
    """Per image 5 boxes (x0, y0, x1, y1) of sides 8..160 px inside the image, and classes."""
    boxes, classes = [], []
    for _ in range(num_images):
        wh = 8 + torch.rand(5, 2, generator=g) * 152
        xy = torch.rand(5, 2, generator=g) * (size - wh)
        boxes.append(torch.cat([xy, xy + wh], 1))
        classes.append(torch.randint(NUM_CLASSES, (5,), generator=g))
    return boxes, classes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=5, help="timed rounds per comparison")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--images", type=int, default=4, help="images per step")
    parser.add_argument("--only", choices=list(MODELS), nargs="*", default=list(MODELS))
    args = parser.parse_args()
    from importlib.metadata import version

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, timm {version('timm')}, effdet {version('effdet')}, "
          f"{platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()}")
    rows = []
    per_image = None
    for preset in args.only:
        name, size = MODELS[preset]
        ours, cfg = libraghm_model(preset)
        train, predict = effdet_models(name)
        mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
        std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
        g = torch.Generator().manual_seed(1)
        images = [torch.rand(3, size, size, generator=g) * 255 for _ in range(args.images)]
        boxes, classes = random_boxes(args.images, size, g)
        batch = []
        for img, b, c in zip(images, boxes, classes):
            inst = Instances((size, size), gt_boxes=Boxes(b), gt_classes=c)
            batch.append({"image": img, "instances": inst})
        x = torch.stack([(img - mean) / std for img in images])  # effdet: normalised input
        target = {"bbox": torch.stack([b[:, [1, 0, 3, 2]] for b in boxes]),  # yxyx
                  "cls": torch.stack(classes).float() + 1}  # classes from 1
        n_ours = sum(p.numel() for p in ours.parameters())
        n_effdet = sum(p.numel() for p in train.model.parameters())
        opts = {"ours": torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9),
                "effdet": torch.optim.SGD(train.parameters(), lr=1e-3, momentum=0.9)}

        def train_step(which):
            opts[which].zero_grad(set_to_none=True)
            if which == "ours":
                ours.train()
                loss = sum(ours(batch).values())
            else:
                train.train()
                loss = train(x, target)["loss"]
            loss.backward()
            opts[which].step()
            return loss.detach()

        times = time_interleaved(train_step, ["ours", "effdet"], args.iters, args.warmup, "cpu")
        rows.append((f"{preset} training step, {args.images} x {size}^2", times, n_ours, n_effdet))

        def network_step(which):  # the network alone: no anchor labelling, no losses
            if which == "ours":
                features = ours.backbone(x)
                outputs = ours.head([features[f] for f in ours.head_in_features])
            else:
                outputs = train.model(x)
            sum(t.sum() for level in outputs for t in level).backward()

        times = time_interleaved(network_step, ["ours", "effdet"], args.iters, args.warmup, "cpu")
        rows.append((f"{preset} network forward + backward only", times, n_ours, n_effdet))

        ours.eval()
        predict.eval()
        inputs = [{"image": img} for img in images]

        def infer(which, imgs=inputs, xs=x):
            with torch.no_grad():
                ours(imgs) if which == "ours" else predict(xs)

        times = time_interleaved(infer, ["ours", "effdet"], args.iters, args.warmup, "cpu")
        rows.append((f"{preset} inference, {args.images} x {size}^2", times, n_ours, n_effdet))
        if preset == "Lite0":
            one = [inputs[0]]
            times = time_interleaved(lambda w: infer(w, one, x[:1]), ["ours", "effdet"],
                                     3 * args.iters, args.warmup, "cpu")
            rows.append((f"{preset} inference, 1 x {size}^2", times, n_ours, n_effdet))
            per_image = statistics.median(times["ours"])

    print()
    print("| what | LibraGHM ms | effdet ms | LibraGHM / effdet (median of rounds) | parameters LibraGHM / effdet |")
    print("|---|---|---|---|---|")
    for what, times, n_ours, n_effdet in rows:
        print(f"| {what} | {1000 * statistics.median(times['ours']):.0f} | "
              f"{1000 * statistics.median(times['effdet']):.0f} | "
              f"{per_round_ratio(times, 'ours', 'effdet'):.2f} | "
              f"{n_ours / 1e6:.2f}M / {n_effdet / 1e6:.2f}M |")
    if per_image is not None:
        print(f"\nLibraGHM EfficientDet-Lite0 inference: {1000 * per_image:.0f} ms per 320 x 320 image "
              "(batch 1, median)")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
