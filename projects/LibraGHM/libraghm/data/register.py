"""Dataset registration: the built-in shapes splits and users' own COCO-format datasets."""
import json
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


def check_coco_dataset(name, json_file, image_root):
    """
    Validate a COCO-format dataset's paths and json structure before training starts.

    Raises:
        FileNotFoundError: if ``json_file`` or ``image_root`` does not exist.
        ValueError: if the json is not COCO detection format.
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


def register_coco_dataset(name, json_file, image_root):
    """
    Check and register a user's COCO-format dataset under ``name`` through Detectron2's COCO path.

    Args:
        name (str): dataset name to use in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        json_file (str): COCO instances json.
        image_root (str): folder the json's ``file_name`` entries are relative to.
    """
    from detectron2.data.datasets import register_coco_instances

    check_coco_dataset(name, json_file, image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name).as_dict()
        if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
            return
        raise ValueError(
            f"Dataset name {name!r} is already registered with other paths; pick another name."
        )
    register_coco_instances(name, {}, json_file, image_root)


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
                check_coco_dataset(name, meta.json_file, meta.image_root)
