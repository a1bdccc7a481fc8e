#!/usr/bin/env python
"""
Turn a training output into a model-zoo release file in Detectron2's format.

    python tools/publish_model.py output/model_zoo/train/libra_faster_rcnn \
        model_zoo/Shapes-Detection/libra_faster_rcnn

writes ``model_final_<sha256[:8]>.pth`` (``{"model": state_dict}``: DetectionCheckpointer loads it
as initial weights, with no optimizer or iteration), ``config.yaml`` and ``metrics.json`` (the
last COCO evaluation of the training) into the destination directory, and prints the file name.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "LibraGHM"))

from compare_ap import last_evaluation  # noqa: E402
from libraghm.model_zoo.release import release_checkpoint  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", help="a training OUTPUT_DIR (with model_final.pth and config.yaml)")
    p.add_argument("dest_dir", help="release directory")
    p.add_argument("--checkpoint", default="model_final.pth", help="checkpoint file inside output_dir")
    a = p.parse_args()
    ev = last_evaluation(a.output_dir)
    metrics = None if ev is None else {k: v for k, v in ev.items() if "/" in k and k.split("/")[0] in ("bbox", "segm")}
    out = release_checkpoint(
        os.path.join(a.output_dir, a.checkpoint), os.path.join(a.output_dir, "config.yaml"), a.dest_dir, metrics
    )
    print(out)


if __name__ == "__main__":
    main()
