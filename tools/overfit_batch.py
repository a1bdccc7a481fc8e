"""Can a model fit one batch? Train it on a single fixed batch and print its losses.

A diagnostic for "this config trains to almost nothing": a model that cannot drive its training loss
down on one batch of 4 images within a few dozen SGD steps has a defect or learns too slowly for the
schedule, and comparing heads / necks / losses on the same batch in a minute says which part it is::

    python tools/overfit_batch.py --config-file configs/Shapes-Detection/efficientdet_lite0.yaml \\
        --iters 40 SEED 1
    python tools/overfit_batch.py --config-file configs/Shapes-Detection/efficientdet_lite0.yaml \\
        --iters 40 --effdet-head SEED 1        # effdet's HeadNet in place of LibraGHM's (reference)

The batch is the first one of the config's training loader (fixed by ``SEED``), the optimizer SGD
with momentum 0.9, weight decay 1e-4 and the config's ``SOLVER.BASE_LR`` after a linear warm-up over
20 steps. Losses are printed every 10 steps (training mode).
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_net  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402


class _EffdetHead(torch.nn.Module):
    """effdet's (the PyTorch reference's) class and box ``HeadNet`` with its own initialisation."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        from effdet.config import get_efficientdet_config
        from effdet.efficientdet import HeadNet, _init_weight

        ec = get_efficientdet_config("tf_efficientdet_lite0")
        ec.num_levels = len(cfg.MODEL.RETINANET.IN_FEATURES)
        ec.fpn_channels = cfg.MODEL.BIFPN.WIDTH
        ec.box_class_repeats = cfg.MODEL.EFFICIENTDET.BOX_CLASS_REPEATS
        ec.act_type = {"silu": "swish"}.get(cfg.MODEL.EFFICIENTDET.ACTIVATION, cfg.MODEL.EFFICIENTDET.ACTIVATION)
        ec.head_bn_level_first = True
        self.class_net = HeadNet(ec, num_outputs=num_classes)
        self.box_net = HeadNet(ec, num_outputs=4)
        for name, module in self.named_modules():
            _init_weight(module, name)

    def forward(self, features):
        return self.class_net(features), self.box_net(features)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--effdet-head", action="store_true", help="EfficientDet configs: effdet's HeadNet")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args()
    cfg = train_net.setup(default_argument_parser().parse_args(["--config-file", args.config_file, *args.opts]))
    model = train_net.Trainer.build_model(cfg)
    if args.effdet_head:
        model.head = _EffdetHead(cfg, cfg.MODEL.RETINANET.NUM_CLASSES)
    batch = next(iter(train_net.Trainer.build_train_loader(cfg)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.SOLVER.BASE_LR, momentum=0.9, weight_decay=1e-4)
    model.train()
    with EventStorage(0) as storage:
        for step in range(args.iters):
            for group in optimizer.param_groups:
                group["lr"] = cfg.SOLVER.BASE_LR * min(1.0, (step + 1) / 20)
            losses = model(batch)
            total = sum(losses.values())
            if not math.isfinite(float(total)):
                sys.exit(f"step {step}: non-finite loss {losses}")
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            storage.iter += 1
            if step % 10 == 0 or step == args.iters - 1:
                print(step, {k: round(float(v), 4) for k, v in losses.items()}, flush=True)


if __name__ == "__main__":
    main()
