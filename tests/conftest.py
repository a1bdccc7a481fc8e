"""Shared test setup: dataset cache, config helpers and tiny inputs for LibraGHM's tests."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The built-in dataset is generated on first use; keep the tests' copy in the repository's ignored cache.
os.environ.setdefault("LIBRAGHM_DATASETS", os.path.join(REPO, ".cache", "datasets"))
sys.path.insert(0, os.path.join(REPO, "projects", "LibraGHM"))
sys.path.insert(0, REPO)

import pytest  # noqa: E402
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402

import libraghm  # noqa: E402,F401  registers everything
from libraghm import add_libraghm_config  # noqa: E402
from libraghm.modeling import apply_efficientdet_preset  # noqa: E402

CONFIGS = os.path.join(REPO, "configs")


def config_path(rel):
    """Absolute path of a config file given relative to ``configs/``."""
    return os.path.join(CONFIGS, rel)


def get_config(rel_path, *opts, tiny=True):
    """
    Load a LibraGHM config for tests.

    Args:
        rel_path (str): path relative to ``configs/``.
        opts: ``KEY, VALUE, ...`` overrides as on the command line.
        tiny (bool): shrink inputs and proposal counts so a training step takes well under a second.

    Returns:
        CfgNode: an unfrozen config on the CPU.
    """
    cfg = get_cfg()
    add_libraghm_config(cfg)
    cfg.merge_from_file(config_path(rel_path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    if tiny:
        if cfg.MODEL.EFFICIENTDET.PRESET:  # the small inputs below replace the preset's
            cfg.MODEL.EFFICIENTDET.OVERRIDES = list(cfg.MODEL.EFFICIENTDET.OVERRIDES) + [
                "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST"]
        cfg.INPUT.MIN_SIZE_TRAIN = (128,)
        cfg.INPUT.MAX_SIZE_TRAIN = 192
        cfg.INPUT.MIN_SIZE_TEST = 128
        cfg.INPUT.MAX_SIZE_TEST = 192
        cfg.DATASETS.TRAIN = ("shapes_train_mini",)
        cfg.DATASETS.TEST = ("shapes_val_mini",)
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.merge_from_list(list(opts))
    apply_efficientdet_preset(cfg)  # as train_net.py's setup does (a no-op without a preset)
    return cfg


_BASE_CFGS = {}


def cached_config(rel_path, *opts):
    """``get_config(rel_path, *opts)`` from a parsed copy of the file kept for the session (fast)."""
    if rel_path not in _BASE_CFGS:
        _BASE_CFGS[rel_path] = get_config(rel_path)
    cfg = _BASE_CFGS[rel_path].clone()
    cfg.merge_from_list(list(opts))
    return cfg


def spec_message(key, spec, value):
    """The error a PARAMS spec gives for ``value`` at ``key`` (the validation oracle)."""
    return f"{key} = {value!r} is invalid: expected {spec.describe()}."


def tiny_batch(num_images=2, height=128, width=160, seed=0, with_gt=(True, True)):
    """
    Detectron2-format training inputs from the built-in dataset's renderer (real shapes, real boxes).

    Args:
        num_images (int): batch size.
        height, width (int): image size (the image is resized to it).
        seed (int): RNG seed.
        with_gt (tuple[bool]): per image, whether it keeps its ground truth (False: no GT at all).

    Returns:
        list[dict]: inputs with "image" (uint8 CHW) and "instances" (gt_boxes, gt_classes, gt_masks).
    """
    import numpy as np
    import cv2
    from detectron2.structures import BitMasks, Boxes, Instances

    from libraghm.data.shapes import _render_image

    batch = []
    for i in range(num_images):
        rng = np.random.default_rng([1234, seed, i])
        img, objects = _render_image(rng)
        h0, w0 = img.shape[:2]
        img = cv2.resize(img, (width, height))
        inst = Instances((height, width))
        keep = with_gt[i % len(with_gt)]
        pairs = []
        for c, m in objects if keep else []:
            m = cv2.resize(m.astype("uint8"), (width, height), interpolation=cv2.INTER_NEAREST)
            if m.any():
                pairs.append((c, m))
        masks = [m for _, m in pairs]
        classes = [c for c, _ in pairs]
        if masks:
            bm = BitMasks(torch.from_numpy(np.stack(masks)).bool())
            inst.gt_boxes = bm.get_bounding_boxes()
            inst.gt_masks = bm
        else:
            inst.gt_boxes = Boxes(torch.zeros(0, 4))
            inst.gt_masks = BitMasks(torch.zeros(0, height, width, dtype=torch.bool))
        inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
        batch.append(
            {"image": torch.from_numpy(img).permute(2, 0, 1).contiguous(), "instances": inst,
             "height": height, "width": width}
        )
    return batch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_train_opts(output_dir, max_iter, *extra):
    """Command-line overrides for a short train_net.py run on the mini splits (a few seconds)."""
    return [
        "OUTPUT_DIR", str(output_dir), "MODEL.DEVICE", "cpu",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
        "DATASETS.TRAIN", "('shapes_train_mini',)", "DATASETS.TEST", "('shapes_val_mini',)",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0", "SEED", "7",
    ] + [str(e) for e in extra]
