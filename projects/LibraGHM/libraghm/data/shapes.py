"""The built-in "shapes" detection dataset.

A deterministic, seeded synthetic dataset that is generated on first use into a cache folder as
PNG images plus COCO-format json, then loaded through Detectron2's standard COCO path
(:func:`detectron2.data.datasets.load_coco_json`), so that mapping, evaluation with
COCOEvaluator and visualisation run exactly as with real data.

It is built to make the balancing methods matter:
- five categories with an uneven frequency (the rarest is ~4x rarer than the most common);
- objects from 8 px to half the image side, aspect ratios from 1:2.5 to 2.5:1;
- occlusion (objects overlap; boxes and RLE masks cover the visible part);
- distractors that resemble objects (hexagons next to circles, irregular polygons, scribbles);
- textured backgrounds (gradients, stripes, checkerboards, noise).
"""
import json
import os
import shutil
import tempfile
import time

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = ["SHAPES_CATEGORIES", "SHAPES_SPLITS", "shapes_root", "generate_shapes", "ensure_shapes"]

# (name, relative frequency)
SHAPES_CATEGORIES = [
    ("circle", 0.32), ("rectangle", 0.26), ("triangle", 0.20), ("star", 0.14), ("cross", 0.08),
]
# split name -> (number of images, seed). Bumping VERSION regenerates every cached copy.
SHAPES_SPLITS = {"train": (1500, 1), "val": (300, 2), "train_mini": (24, 3), "val_mini": (12, 4)}
VERSION = 1
IMAGE_SIZE_RANGE = (224, 288)
MIN_VISIBLE_FRACTION = 0.35


def shapes_root(root=None):
    """
    Returns:
        str: the cache folder of the built-in dataset: ``root`` if given, else
        ``$LIBRAGHM_DATASETS/shapes_v{VERSION}``, else ``~/.cache/libraghm/shapes_v{VERSION}``.
    """
    if root:
        return root
    base = os.environ.get("LIBRAGHM_DATASETS") or os.path.expanduser("~/.cache/libraghm")
    return os.path.join(base, f"shapes_v{VERSION}")


def _regular_polygon(cx, cy, rx, ry, n, phase, inner=None):
    """Vertices of a (star-)polygon with n points inscribed in an ellipse."""
    k = 2 * n if inner else n
    ang = phase + np.arange(k) * 2 * np.pi / k
    rad = np.ones(k)
    if inner:
        rad[1::2] = inner
    return np.stack([cx + rx * rad * np.cos(ang), cy + ry * rad * np.sin(ang)], 1)


def _draw_shape(mask, kind, cx, cy, w, h, rng):
    """Rasterise one shape of the given kind into the uint8 ``mask`` (in place)."""
    rx, ry = w / 2.0, h / 2.0
    if kind == "circle":
        axes = (max(int(rx), 1), max(int(ry), 1))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, 0, 0, 360, 1, -1)
        return
    if kind == "rectangle":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [rx, ry] + [cx, cy]
    elif kind == "triangle":
        pts = np.array([[cx, cy - ry], [cx + rx, cy + ry], [cx - rx, cy + ry]])
        if rng.random() < 0.5:
            pts[:, 1] = 2 * cy - pts[:, 1]
    elif kind == "star":
        pts = _regular_polygon(cx, cy, rx, ry, 5, -np.pi / 2, inner=0.45)
    elif kind == "cross":
        t = 0.33
        pts = np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1],
                        [-t, t], [-1, t], [-1, -t], [-t, -t]]) * [rx, ry] + [cx, cy]
    elif kind == "hexagon":  # distractor resembling a circle
        pts = _regular_polygon(cx, cy, rx, ry, 6, rng.uniform(0, np.pi))
    elif kind == "blob":  # distractor: irregular polygon
        n = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(0.4, 1.0, n)
        pts = np.stack([cx + rx * rad * np.cos(ang), cy + ry * rad * np.sin(ang)], 1)
    else:
        raise ValueError(f"Unknown shape kind {kind!r}")
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)


def _background(rng, h, w):
    """A textured background: gradient + one of stripes / checkerboard / blotches, plus noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    ang = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(ang) * xx + np.sin(ang) * yy) / (h + w) + 0.5).clip(0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    style = rng.integers(0, 3)
    amp = rng.uniform(10, 35)
    if style == 0:
        period = rng.uniform(6, 30)
        a2 = rng.uniform(0, np.pi)
        img += amp * np.sin((np.cos(a2) * xx + np.sin(a2) * yy) * 2 * np.pi / period)[..., None]
    elif style == 1:
        cell = int(rng.integers(8, 40))
        img += amp * (((xx // cell + yy // cell) % 2) * 2 - 1)[..., None]
    else:
        low = rng.normal(0, 1, (max(h // 16, 2), max(w // 16, 2), 3)).astype(np.float32)
        img += amp * cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 6, img.shape)
    return img


def _render_image(rng):
    """Render one image. Returns (uint8 HxWx3 BGR image, list of (category index, bool mask))."""
    h, w = (int(v) for v in rng.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1, 2))
    img = _background(rng, h, w)
    owner = np.full((h, w), -1, np.int32)  # index of the object visible at each pixel (-1: none)
    freqs = np.array([f for _, f in SHAPES_CATEGORIES])
    n_obj = int(rng.integers(2, 9))
    n_distract = int(rng.integers(1, 6))
    # Interleave objects and distractors so either can occlude the other.
    order = rng.permutation([1] * n_obj + [0] * n_distract)
    labels = []
    for is_obj in order:
        side = float(np.exp(rng.uniform(np.log(8), np.log(min(h, w) / 2))))
        aspect = float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
        bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
        bw, bh = min(bw, w * 0.6), min(bh, h * 0.6)
        cx, cy = rng.uniform(bw / 2, w - bw / 2), rng.uniform(bh / 2, h - bh / 2)
        m = np.zeros((h, w), np.uint8)
        if is_obj:
            cat = int(rng.choice(len(SHAPES_CATEGORIES), p=freqs / freqs.sum()))
            _draw_shape(m, SHAPES_CATEGORIES[cat][0], cx, cy, bw, bh, rng)
        elif rng.random() < 0.25:  # scribble distractor
            pts = np.stack([rng.uniform(0, w, 4), rng.uniform(0, h, 4)], 1).astype(np.int32)
            cv2.polylines(m, [pts], False, 1, int(rng.integers(1, 4)))
            cat = -1
        else:
            _draw_shape(m, "hexagon" if rng.random() < 0.5 else "blob", cx, cy, bw, bh, rng)
            cat = -1
        m = m.astype(bool)
        if not m.any():
            continue
        color = rng.uniform(0, 255, 3)
        shade = rng.uniform(0.75, 1.0)
        img[m] = color * shade + rng.normal(0, 4, (int(m.sum()), 3))
        owner[m] = len(labels)
        labels.append((cat, m))
    objects = []
    for i, (cat, m) in enumerate(labels):
        if cat < 0:
            continue
        visible = owner == i
        if visible.sum() >= max(MIN_VISIBLE_FRACTION * m.sum(), 6):
            objects.append((cat, visible))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def generate_shapes(root, split):
    """
    Generate one split of the dataset into ``root`` (deterministic for a given split).

    Args:
        root (str): the dataset folder; writes ``root/<split>/*.png`` and
            ``root/annotations/instances_<split>.json``.
        split (str): a key of :data:`SHAPES_SPLITS`.

    Returns:
        str: the path of the written json file.
    """
    if split not in SHAPES_SPLITS:
        raise KeyError(f"Unknown shapes split {split!r}; valid splits: {sorted(SHAPES_SPLITS)}")
    num_images, seed = SHAPES_SPLITS[split]
    images, annotations = [], []
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    # Write into a temporary folder and rename, so concurrent processes never see half a split.
    tmp_dir = tempfile.mkdtemp(prefix=f".{split}-", dir=root)
    for idx in range(num_images):
        rng = np.random.default_rng([VERSION, seed, idx])
        img, objects = _render_image(rng)
        file_name = f"{idx:06d}.png"
        cv2.imwrite(os.path.join(tmp_dir, file_name), img)
        images.append({"id": idx + 1, "file_name": file_name, "height": img.shape[0],
                       "width": img.shape[1]})
        for cat, m in objects:
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1, "image_id": idx + 1, "category_id": cat + 1,
                "bbox": [x, y, bw, bh], "area": float(mask_util.area(rle)), "segmentation": rle,
                "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"LibraGHM built-in shapes dataset v{VERSION}, split {split}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, (n, _) in enumerate(SHAPES_CATEGORIES)],
    }
    image_dir = os.path.join(root, split)
    json_file = os.path.join(root, "annotations", f"instances_{split}.json")
    try:
        os.rename(tmp_dir, image_dir)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return json_file
    tmp_json = json_file + f".tmp{os.getpid()}"
    with open(tmp_json, "w") as f:
        json.dump(coco, f)
    os.replace(tmp_json, json_file)
    return json_file


def ensure_shapes(split, root=None):
    """
    Generate a split on first use.

    Args:
        split (str): a key of :data:`SHAPES_SPLITS`.
        root (str or None): the dataset folder (default: :func:`shapes_root`).

    Returns:
        tuple[str, str]: (json_file, image_root) of the split.
    """
    root = shapes_root(root)
    json_file = os.path.join(root, "annotations", f"instances_{split}.json")
    image_root = os.path.join(root, split)
    if not os.path.isfile(json_file):
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(image_root):  # images without json: a crashed earlier run
            shutil.rmtree(image_root, ignore_errors=True)
        generate_shapes(root, split)
        # Another process may have renamed its images in first; wait for its json.
        for _ in range(600):
            if os.path.isfile(json_file):
                break
            time.sleep(0.5)
    return json_file, image_root
