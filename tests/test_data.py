"""The built-in dataset: deterministic generation, COCO registration, and clear errors on bad paths."""
import filecmp
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from conftest import get_config
from libraghm.data import SHAPES_CATEGORIES, ensure_shapes, generate_shapes, prepare_datasets, register_coco_dataset


def test_generation_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ja = generate_shapes(str(a), "val_mini")
    jb = generate_shapes(str(b), "val_mini")
    assert json.load(open(ja)) == json.load(open(jb))
    names = sorted(os.listdir(a / "val_mini"))
    assert len(names) == 12
    match, mismatch, errors = filecmp.cmpfiles(a / "val_mini", b / "val_mini", names, shallow=False)
    assert mismatch == [] and errors == []
    # and a different split really is different data
    jc = generate_shapes(str(a), "train_mini")
    assert json.load(open(jc))["annotations"][:5] != json.load(open(ja))["annotations"][:5]


def test_dataset_statistics_make_balancing_matter():
    json_file, _ = ensure_shapes("train_mini")
    # use the full val split for statistics: 300 images
    json_file, _ = ensure_shapes("val")
    coco = json.load(open(json_file))
    cats = np.array([a["category_id"] for a in coco["annotations"]])
    counts = np.bincount(cats, minlength=len(SHAPES_CATEGORIES) + 1)[1:]
    assert len(counts) == 5 and counts.min() > 0
    assert counts.max() / counts.min() > 2.5, counts  # uneven class frequency
    wh = np.array([a["bbox"][2:] for a in coco["annotations"]])
    side = np.sqrt(wh[:, 0] * wh[:, 1])
    assert side.min() < 12 and side.max() > 100  # ~8 px up to half the image
    aspect = wh[:, 0] / wh[:, 1]
    assert aspect.min() < 0.5 and aspect.max() > 2.0
    # occlusion: objects overlap each other (boxes and masks cover only the visible part)
    from collections import defaultdict

    import torch
    from detectron2.structures import Boxes, pairwise_iou

    per_image = defaultdict(list)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        per_image[a["image_id"]].append([x, y, x + w, y + h])
    overlapping = 0
    for boxes in per_image.values():
        b = Boxes(torch.tensor(boxes))
        iou = pairwise_iou(b, b).fill_diagonal_(0)
        overlapping += int((iou > 0).any(1).sum())
    assert overlapping / len(coco["annotations"]) > 0.15
    assert {"train", "val"} <= {n.split("_", 1)[1] for n in DatasetCatalog.list() if n.startswith("shapes_")}


def test_registered_through_detectron2_coco_path():
    dicts = DatasetCatalog.get("shapes_val_mini")
    assert len(dicts) == 12
    ann = dicts[0]["annotations"][0]
    assert ann["bbox_mode"] == BoxMode.XYWH_ABS and "segmentation" in ann
    meta = MetadataCatalog.get("shapes_val_mini")
    assert meta.thing_classes == [n for n, _ in SHAPES_CATEGORIES]
    assert meta.evaluator_type == "coco" and os.path.isfile(meta.json_file)


def test_missing_user_dataset_path_fails_before_training(tmp_path):
    cfg = get_config(
        "Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
        "LIBRAGHM.COCO_DATASETS", [["user_missing", str(tmp_path / "nope.json"), str(tmp_path)]],
        "DATASETS.TRAIN", ("user_missing",),
    )
    with pytest.raises(FileNotFoundError, match="nope.json"):
        prepare_datasets(cfg)


def test_malformed_user_dataset_fails_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match="missing top-level keys.*annotations"):
        register_coco_dataset("user_bad", str(bad), str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid json"):
        register_coco_dataset("user_broken", str(broken), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="image folder"):
        register_coco_dataset("user_noimg", str(bad), str(tmp_path / "missing_dir"))


def test_unregistered_dataset_name_is_reported():
    cfg = get_config("Shapes-Detection/faster_rcnn_small_R_FPN.yaml", "DATASETS.TEST", ("no_such_set",))
    with pytest.raises(KeyError, match="no_such_set"):
        prepare_datasets(cfg)


def test_user_coco_dataset_trains_through_config(tmp_path):
    """A user's COCO json (here: a copy of the mini split) registers from the config and loads."""
    json_file, image_root = ensure_shapes("val_mini")
    cfg = get_config(
        "Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
        "LIBRAGHM.COCO_DATASETS", [["user_ok", json_file, image_root]],
        "DATASETS.TRAIN", ("user_ok",),
    )
    prepare_datasets(cfg)
    assert len(DatasetCatalog.get("user_ok")) == 12


def _user_dataset(tmp_path, defects, rng):
    """A small COCO dataset built from the shapes val_mini split, with the given defects injected."""
    src_json, src_root = ensure_shapes("val_mini")
    coco = json.load(open(src_json))
    root = tmp_path / "images"
    root.mkdir()
    for img in coco["images"]:
        os.symlink(os.path.join(src_root, img["file_name"]), root / img["file_name"])
    expect = {"missing": 0, "orphans": 0, "degenerate": 0}
    for defect in defects:
        if defect == "missing":  # an image file listed in the json is not there
            img = coco["images"][int(rng.integers(len(coco["images"])))]
            if (root / img["file_name"]).exists():
                os.remove(root / img["file_name"])
                expect["missing"] += 1
        elif defect == "orphan":  # an annotation refers to an unknown image id
            ann = dict(coco["annotations"][0], id=10**6 + expect["orphans"],
                       image_id=10**6 + expect["orphans"])
            coco["annotations"].append(ann)
            expect["orphans"] += 1
        else:  # a box with a non-positive or non-finite width or height
            ann = coco["annotations"][int(rng.integers(len(coco["annotations"])))]
            if ann["bbox"][2] > 0 and ann["bbox"][3] > 0 and all(np.isfinite(ann["bbox"])):
                ann["bbox"][2 + int(rng.integers(2))] = float(rng.choice([0.0, -3.0, np.inf, np.nan]))
                expect["degenerate"] += 1
    json_file = tmp_path / "ann.json"
    json_file.write_text(json.dumps(coco))  # inf / nan as the json module writes them
    return str(json_file), str(root), expect


@pytest.mark.parametrize("seed", range(12))
def test_user_dataset_defects_fail_or_drop_before_training(tmp_path, seed):
    """Random defects in a user's COCO data: missing image files and unknown image ids fail before
    training with counts; boxes with non-positive or non-finite sides are dropped (and counted)."""
    rng = np.random.default_rng(seed)
    defects = list(rng.choice(["missing", "orphan", "degenerate"], size=int(rng.integers(1, 4))))
    json_file, root, expect = _user_dataset(tmp_path, defects, rng)
    name = f"user_defects_{seed}"
    cfg = get_config("Shapes-Detection/faster_rcnn_small_R_FPN.yaml", "LIBRAGHM.COCO_DATASETS",
                     [[name, json_file, root]], "DATASETS.TRAIN", (name,))
    if expect["missing"]:
        with pytest.raises(FileNotFoundError, match=f"{expect['missing']} of 12 image files"):
            prepare_datasets(cfg)
    elif expect["orphans"]:
        with pytest.raises(ValueError, match=f"refer to {expect['orphans']} image ids"):
            prepare_datasets(cfg)
    else:
        prepare_datasets(cfg)
        dicts = DatasetCatalog.get(name)
        kept = sum(len(d["annotations"]) for d in dicts)
        total = len(json.load(open(json_file))["annotations"])
        assert kept == total - expect["degenerate"]
        assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 and np.isfinite(a["bbox"]).all()
                   for d in dicts for a in d["annotations"])


def test_fewer_classes_than_the_dataset_fails_naming_the_key(tmp_path):
    json_file, root, _ = _user_dataset(tmp_path, [], np.random.default_rng(0))
    cfg = get_config("Shapes-Detection/faster_rcnn_small_R_FPN.yaml", "LIBRAGHM.COCO_DATASETS",
                     [["user_classes", json_file, root]], "DATASETS.TRAIN", ("user_classes",),
                     "MODEL.ROI_HEADS.NUM_CLASSES", 3)
    with pytest.raises(ValueError, match=r"MODEL\.ROI_HEADS\.NUM_CLASSES = 3 is invalid .* 5 categories"):
        prepare_datasets(cfg)
