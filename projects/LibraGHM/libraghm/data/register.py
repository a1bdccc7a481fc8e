"""Dataset registration: the built-in shapes splits and users' own COCO-format datasets."""
import json
import logging
import math
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import SHAPES_CATEGORIES, SHAPES_SPLITS, ensure_shapes, shapes_root

__all__ = ["register_shapes", "register_coco_dataset", "prepare_datasets", "check_coco_dataset"]


def register_shapes():
    """Register every split of the built-in dataset as ``shapes_<split>`` (generated on use)."""
    root = shapes_root()
    for split in SHAPES_SPLITS:
        name = f"shapes_{split}"
        if name in DatasetCatalog.list():
            continue
        # loaded by Detectron2's COCO loader, generated on first use
        DatasetCatalog.register(name, lambda n=name, s=split: load_coco_json(*ensure_shapes(s), n))
        MetadataCatalog.get(name).set(
            json_file=os.path.join(root, "annotations", f"instances_{split}.json"),
            image_root=os.path.join(root, split),
            evaluator_type="coco",
            thing_classes=[n for n, _ in SHAPES_CATEGORIES],
            libraghm_shapes_split=split,
        )


def _degenerate(ann):
    box = ann.get("bbox")
    return not (isinstance(box, (list, tuple)) and len(box) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
                and box[2] > 0 and box[3] > 0)


def _examples(items, n=3):
    items = list(items)
    return ", ".join(repr(i) for i in items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_coco_dataset(name, json_file, image_root):
    """
    Check a COCO-format dataset before training starts, cheaply (no image is decoded).

    Fails (FileNotFoundError / ValueError) when the json or image folder is missing, the json is
    not a COCO instances file, an image file listed in the json is missing, or an annotation refers
    to an image id the json does not list. Annotations whose box has a non-positive or non-finite
    width or height are counted in the report: :func:`register_coco_dataset` drops them when
    loading (Detectron2's loader would keep them, and flipping would even turn a negative-width box
    into a valid-looking one).

    Args:
        name (str): the dataset name, for messages.
        json_file (str): COCO instances json.
        image_root (str): folder the json's ``file_name`` entries are relative to.

    Returns:
        dict: counts: "images", "annotations", "categories", "degenerate_boxes" (the annotations
        that are dropped).
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"COCO dataset {name!r}: annotation file {json_file!r} does not exist "
            "(expected a COCO-format instances json)."
        )
    if not os.path.isdir(image_root):
        raise FileNotFoundError(
            f"COCO dataset {name!r}: image folder {image_root!r} does not exist."
        )
    try:
        with open(json_file) as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"COCO dataset {name!r}: {json_file!r} is not valid json ({e}).") from e
    keys = ("images", "annotations", "categories")
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(
            f"COCO dataset {name!r}: {json_file!r} is not a COCO instances file; "
            f"missing top-level keys {missing} (need 'images', 'annotations', 'categories')."
        )
    images = {img.get("id"): img.get("file_name", "") for img in data["images"]}
    absent = [f for f in images.values() if not os.path.isfile(os.path.join(image_root, f))]
    if absent:
        raise FileNotFoundError(
            f"COCO dataset {name!r}: {len(absent)} of {len(images)} image files listed in "
            f"{json_file!r} are missing under {image_root!r}: {_examples(absent)}."
        )
    orphans = sorted({a.get("image_id") for a in data["annotations"]} - set(images), key=str)
    if orphans:
        raise ValueError(
            f"COCO dataset {name!r}: annotations refer to {len(orphans)} image ids that "
            f"{json_file!r} does not list: {_examples(orphans)}."
        )
    degenerate = [a.get("id") for a in data["annotations"] if _degenerate(a)]
    if degenerate:
        logging.getLogger(__name__).warning(
            "COCO dataset %r: dropping %d of %d annotations whose box has a non-positive or "
            "non-finite width or height (ids %s).", name, len(degenerate),
            len(data["annotations"]), _examples(degenerate))
    return {"images": len(images), "annotations": len(data["annotations"]),
            "categories": len(data["categories"]), "degenerate_boxes": len(degenerate)}


def _load_without_degenerate_boxes(json_file, image_root, name):
    dicts = load_coco_json(json_file, image_root, name)
    for d in dicts:
        # load_coco_json keeps the box as given (XYWH); drop the boxes _degenerate rejects
        d["annotations"] = [a for a in d.get("annotations", []) if not _degenerate(a)]
    return dicts


def register_coco_dataset(name, json_file, image_root):
    """
    Check and register a user's COCO-format dataset under ``name``, loaded by Detectron2's COCO
    loader minus the annotations with degenerate boxes (see :func:`check_coco_dataset`).

    Args:
        name (str): dataset name to use in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        json_file (str): COCO instances json.
        image_root (str): folder the json's ``file_name`` entries are relative to.
    """
    check_coco_dataset(name, json_file, image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name).as_dict()
        if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
            return
        raise ValueError(
            f"Dataset name {name!r} is already registered with other paths; pick another name."
        )
    DatasetCatalog.register(name, lambda: _load_without_degenerate_boxes(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def _num_classes_key(cfg):
    if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE:
        return "MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES
    return "MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES


def prepare_datasets(cfg):
    """
    Register ``cfg.LIBRAGHM.COCO_DATASETS``, check that every dataset named in ``cfg.DATASETS``
    exists, and generate the built-in splits it uses. Call before building the trainer, so a bad
    path fails with a clear message before any training.

    Args:
        cfg (CfgNode): a config with LibraGHM's keys.
    """
    for entry in cfg.LIBRAGHM.COCO_DATASETS:
        if len(entry) != 3:
            raise ValueError(
                "LIBRAGHM.COCO_DATASETS entries must be [name, json_file, image_root]; "
                f"got {entry!r}."
            )
        register_coco_dataset(*entry)
    registered = set(DatasetCatalog.list())
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in registered:
                builtin = sorted(n for n in registered if n.startswith("shapes_"))
                raise KeyError(
                    f"DATASETS.{key} names dataset {name!r}, which is not registered. Register it "
                    "with LIBRAGHM.COCO_DATASETS [[name, json_file, image_root]] or use one of the "
                    f"built-in datasets: {builtin}."
                )
            meta = MetadataCatalog.get(name)
            split = getattr(meta, "libraghm_shapes_split", None)
            if split is not None:
                ensure_shapes(split)
            elif hasattr(meta, "json_file") and hasattr(meta, "image_root"):
                report = check_coco_dataset(name, meta.json_file, meta.image_root)
                classes_key, num_classes = _num_classes_key(cfg)
                if report["categories"] > num_classes:
                    raise ValueError(
                        f"{classes_key} = {num_classes} is invalid for DATASETS.{key} dataset "
                        f"{name!r}: its json has {report['categories']} categories."
                    )
