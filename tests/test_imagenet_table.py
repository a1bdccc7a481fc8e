"""tools/imagenet_table.py: every row shares its baseline's schedule and data, and the table reports mean,
std and the seeds it has."""
import os
import sys

import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import train_net
from conftest import config_path, get_config, tiny_batch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import imagenet_table  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(row):
    return os.path.relpath(os.path.join(REPO, imagenet_table.ROWS[row][0]), os.path.join(REPO, "configs"))


def _cfg(row):
    opts = imagenet_table.ROWS[row][1]
    return train_net.setup(default_argument_parser().parse_args(["--config-file", config_path(_rel(row)), *opts]))


@pytest.mark.parametrize("row", list(imagenet_table.ROWS))
def test_row_builds_and_trains_a_step(row):
    """Before hours of runs: every row's model builds (ImageNet weights included) and steps, finite."""
    model = build_model(get_config(_rel(row), *imagenet_table.ROWS[row][1]))
    model.train()
    with EventStorage(0):
        losses = model(tiny_batch(2))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()


@pytest.mark.parametrize("row", [r for r, v in imagenet_table.ROWS.items() if v[3] is not None])
def test_row_shares_the_baselines_schedule_data_and_backbone(row):
    base, cfg = _cfg(imagenet_table.ROWS[row][3]), _cfg(row)
    for node in ("SOLVER", "INPUT", "DATASETS", "DATALOADER"):
        assert cfg[node] == base[node], (row, node)
    assert cfg.MODEL.EFFICIENTNET == base.MODEL.EFFICIENTNET
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == base.MODEL.ANCHOR_GENERATOR.SIZES
    assert cfg.MODEL.PIXEL_MEAN == base.MODEL.PIXEL_MEAN and cfg.MODEL.PIXEL_STD == base.MODEL.PIXEL_STD


def test_ghm_rows_use_the_papers_recipe_and_name_their_departure():
    for row, (_, opts, what, _) in imagenet_table.ROWS.items():
        cfg = _cfg(row)
        if "ghm" in row:
            assert cfg.LIBRAGHM.CLIP_GRAD_NORM == 35.0  # GHM's published clipping belongs to its rows
            if cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE == "ghm_r":
                assert ("mu 0.2" in what) == (cfg.MODEL.GHM_R.MU == 0.2) and cfg.MODEL.GHM_R.MU in (0.02, 0.2)


def test_table_gives_mean_std_and_seeds():
    results = {"retinanet": {"1": {"AP": 30.0}, "2": {"AP": 34.0}}, "ghm_c": {"1": {"AP": 10.0}},
               "ghm_c_maxw1": {"1": {"AP": float("nan")}}}
    lines = imagenet_table.table(results).splitlines()
    retina = next(line for line in lines if line.startswith("| retinanet |"))
    assert "| 32.0 ± 2.8 | baseline | 2 | 1: 30.0, 2: 34.0 |" in retina
    assert "| 10.0 (one seed) | -22.0 | 1 |" in next(line for line in lines if line.startswith("| ghm_c |"))
    assert "| not run | | 0 |" in next(line for line in lines if line.startswith("| ghm_retinanet |"))
    # no detection above the score threshold (COCO AP NaN) counts as 0
    assert "| 0.0 (one seed) | -32.0 | 1 | 1: no detections |" in next(
        line for line in lines if line.startswith("| ghm_c_maxw1 |"))
