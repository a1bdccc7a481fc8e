#!/usr/bin/env python
"""
Run a trained LibraGHM model on images and write them with the detections drawn by Detectron2's
Visualizer.

    # the released Libra Faster R-CNN on the built-in val split
    python demo/demo.py --model Shapes-Detection/libra_faster_rcnn.yaml --input shapes_val --output output/vis
    # your own checkpoint on a folder (or files, or a glob) of images
    python demo/demo.py --config-file configs/Shapes-Detection/libra_faster_rcnn.yaml \
        --input my_images/ --output output/vis --opts MODEL.WEIGHTS output/demo/model_final.pth

``--input`` is a registered dataset name (its images are read from the dataset dicts, its class
names label the boxes) or image paths / folders / globs.
"""
import argparse
import glob
import os
import sys

import cv2
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "LibraGHM"))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.colormap import colormap  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

from libraghm import add_libraghm_config, model_zoo  # noqa: E402
from libraghm.data import prepare_datasets  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def setup_cfg(args):
    """The model's config: a model-zoo name (with its released weights) or a config file + opts."""
    if args.model:
        cfg = model_zoo.get_config(args.model, trained=True)
    else:
        if not args.config_file:
            raise SystemExit("demo.py: give --model NAME or --config-file FILE")
        cfg = add_libraghm_config(get_cfg())
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.freeze()
    return cfg


def list_inputs(inputs, cfg):
    """
    Args:
        inputs (list[str]): dataset names, image files, folders or globs.
        cfg (CfgNode): the model config (used to register/generate the built-in datasets).

    Returns:
        list[str]: image paths.
        str or None: the dataset whose metadata names the classes (the first dataset given, else
        the config's first training set).
    """
    prepare_datasets(cfg)
    registered = set(DatasetCatalog.list())
    paths, dataset = [], None
    for item in inputs:
        if item in registered:
            paths += [d["file_name"] for d in DatasetCatalog.get(item)]
            dataset = dataset or item
        elif os.path.isdir(item):
            paths += sorted(p for p in glob.glob(os.path.join(item, "*")) if p.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            found = sorted(glob.glob(os.path.expanduser(item)))
            if not found:
                raise FileNotFoundError(
                    f"--input {item!r} is neither a registered dataset, an image, a folder nor a glob "
                    f"that matches files; registered datasets include {sorted(registered)[:8]}"
                )
            paths += found
    return paths, dataset or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None)


def draw_predictions(image_bgr, instances, metadata):
    """
    Args:
        image_bgr (ndarray): (H, W, 3) uint8 image in BGR order.
        instances (Instances): the model's predictions for it.
        metadata (Metadata): class names (and colours) for the labels.

    Returns:
        ndarray: (H, W, 3) uint8 BGR image with boxes, classes and scores drawn.
    """
    # One fixed colour per class (the metadata's thing_colors, else Detectron2's palette in order):
    # with ColorMode.IMAGE the Visualizer would draw every box in a random colour of its palette,
    # grays included, which can vanish on a gray image and changes from run to run.
    instances = instances.to("cpu")
    num_classes = int(instances.pred_classes.max()) + 1 if len(instances) else 0
    metadata = class_colored(metadata, num_classes)
    vis = Visualizer(image_bgr[:, :, ::-1], metadata, instance_mode=ColorMode.SEGMENTATION)
    drawn = vis.draw_instance_predictions(instances, jittering=False)
    return drawn.get_image()[:, :, ::-1]


def class_colored(metadata, num_classes=0):
    """
    Args:
        metadata (Metadata): a dataset's metadata.
        num_classes (int): colour at least the class ids below this (besides ``thing_classes``).

    Returns:
        Metadata: the same metadata if it has enough ``thing_colors``; else a copy (the catalog's
        entry is left alone) whose missing class colours (RGB, 0-255) come from Detectron2's
        palette in order, saturated colours first.
    """
    fields = metadata.as_dict()
    num_classes = max(len(fields.get("thing_classes") or []), num_classes, 1)
    colors = list(fields.get("thing_colors") or [])
    if len(colors) >= num_classes:
        return metadata
    palette = colormap(rgb=True, maximum=255)
    colors += [tuple(int(c) for c in palette[i % len(palette)]) for i in range(len(colors), num_classes)]
    fields["thing_colors"] = colors
    fields.pop("name", None)
    return Metadata(name=(metadata.name or "") + "/class_colored", **fields)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model-zoo config name with a released checkpoint")
    p.add_argument("--config-file", help="a config file (set MODEL.WEIGHTS with --opts)")
    p.add_argument("--input", nargs="+", required=True, help="dataset names, images, folders or globs")
    p.add_argument("--output", required=True, help="folder for the drawn images")
    p.add_argument("--max-images", type=int, default=0, help="process at most this many (0: all)")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    cfg = setup_cfg(args)
    paths, dataset = list_inputs(args.input, cfg)
    if args.max_images > 0:
        paths = paths[: args.max_images]
    metadata = MetadataCatalog.get(dataset) if dataset else MetadataCatalog.get("__unused")
    predictor = DefaultPredictor(cfg)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in paths:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{path} could not be read as an image")
        instances = predictor(image)["instances"]
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        cv2.imwrite(out, np.ascontiguousarray(draw_predictions(image, instances, metadata)))
        written.append(out)
        print(f"{path}: {len(instances)} detections -> {out}")
    return written


if __name__ == "__main__":
    main()
