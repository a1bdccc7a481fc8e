"""demo/demo.py (detections drawn with Detectron2's Visualizer) and tools/paper_figures.py (paper figures)."""
import json
import os
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances, pairwise_iou

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "demo"))
sys.path.insert(0, os.path.join(REPO, "tools"))
import demo  # noqa: E402
import paper_figures  # noqa: E402


def test_draw_predictions_draws_on_the_box_only():
    image = np.full((120, 160, 3), 200, np.uint8)
    inst = Instances((120, 160), pred_boxes=Boxes(torch.tensor([[40.0, 30, 100, 90]])),
                     scores=torch.tensor([0.9]), pred_classes=torch.tensor([1]))
    meta = MetadataCatalog.get("shapes_val_mini")
    drawn = demo.draw_predictions(image, inst, meta)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    changed = np.abs(drawn.astype(int) - image).sum(axis=2) > 30
    assert changed[60, 40] and changed[30, 70]  # the box's left and top edges
    assert not changed[5:20, 110:150].any() and not changed[100:115, 5:30].any()  # far from the box
    empty = demo.draw_predictions(image, inst[:0], meta)
    assert np.array_equal(empty, image)


def test_draw_predictions_colours_by_class_whatever_the_random_state():
    """Same class, same colour (not a random palette entry, which on a gray image can be invisible)."""
    image = np.full((120, 160, 3), 200, np.uint8)
    inst = Instances((120, 160), pred_boxes=Boxes(torch.tensor([[40.0, 30, 100, 90], [10, 10, 30, 30]])),
                     scores=torch.tensor([0.9, 0.8]), pred_classes=torch.tensor([1, 3]))
    meta = MetadataCatalog.get("shapes_val_mini")
    drawings = []
    for seed in range(8):
        np.random.seed(seed)
        drawings.append(demo.draw_predictions(image, inst, meta))
    assert all(np.array_equal(d, drawings[0]) for d in drawings)
    edge = drawings[0][60, 40].astype(int)  # the left edge of the class-1 box: clearly not the gray background
    assert np.abs(edge - 200).sum() > 60
    assert not meta.get("thing_colors")  # the catalog's metadata is left as it was
    # a class id beyond the metadata's classes is drawn too
    other = Instances((120, 160), pred_boxes=inst.pred_boxes[:1], scores=torch.tensor([0.9]),
                      pred_classes=torch.tensor([42]))
    assert demo.draw_predictions(image, other, MetadataCatalog.get("__no_such_dataset")).shape == image.shape


def test_demo_with_the_released_model_finds_the_shapes(tmp_path, capsys):
    out = tmp_path / "vis"
    written = demo.main(["--model", "Shapes-Detection/libra_faster_rcnn.yaml", "--input", "shapes_val_mini",
                         "--output", str(out), "--max-images", "3"])
    assert len(written) == 3
    dicts = DatasetCatalog.get("shapes_val_mini")[:3]
    for path, d in zip(written, dicts):
        img = cv2.imread(path)
        assert img.shape == (d["height"], d["width"], 3)
        assert not np.array_equal(img, cv2.imread(d["file_name"]))
    # the released model detects the ground truth (trained, not random weights)
    model = demo.DefaultPredictor(demo.setup_cfg(demo.argparse.Namespace(
        model="Shapes-Detection/libra_faster_rcnn.yaml", config_file=None, opts=[], confidence_threshold=0.5)))
    found = total = 0
    for d in dicts:
        pred = model(cv2.imread(d["file_name"]))["instances"]
        gt = Boxes(torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32))
        if d["annotations"] and d["annotations"][0].get("bbox_mode", 1) == 1:  # XYWH_ABS
            gt.tensor[:, 2:] += gt.tensor[:, :2]
        total += len(gt)
        if len(pred):
            found += int((pairwise_iou(gt, pred.pred_boxes).amax(dim=1) > 0.5).sum())
    assert found >= 0.6 * total, (found, total)


def test_demo_reads_a_folder_and_rejects_a_missing_input(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    src = DatasetCatalog.get("shapes_val_mini")[0]["file_name"]
    cv2.imwrite(str(folder / "mine.png"), cv2.imread(src))
    written = demo.main(["--model", "Shapes-Detection/libra_faster_rcnn.yaml", "--input", str(folder),
                         "--output", str(tmp_path / "out")])
    assert [os.path.basename(w) for w in written] == ["mine.png"]
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        demo.main(["--model", "Shapes-Detection/libra_faster_rcnn.yaml", "--input", str(tmp_path / "no_such_dir"),
                   "--output", str(tmp_path / "out")])


def test_reweighted_gradient_norms_match_autograd():
    """Focal loss and CE curves are |d loss / d x| written in terms of g = |p - p*| (target 1)."""
    g = np.array([0.05, 0.3, 0.6, 0.9])
    curves = paper_figures.reweighted_gradient_norms(g, gamma=2.0, fraction=[0.5, 0.25, 0.25, 0.0])
    p = torch.tensor(1 - g, dtype=torch.float64)
    x = torch.log(p / (1 - p)).requires_grad_()
    q = torch.sigmoid(x)
    focal = -((1 - q) ** 2 * torch.log(q)).sum()
    (grad,) = torch.autograd.grad(focal, x)
    assert curves["focal loss"] == pytest.approx(grad.abs().numpy(), rel=1e-9)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="sum")
    (grad,) = torch.autograd.grad(ce, x)
    assert curves["cross-entropy"] == pytest.approx(grad.abs().numpy(), rel=1e-9)
    # GHM-C: g * beta(g), beta = 1 / (M * fraction of g's bin); empty bins have no weight (NaN)
    assert curves["GHM-C"][:3] == pytest.approx([0.05 * 0.5, 0.3 * 1.0, 0.6 * 1.0])
    assert np.isnan(curves["GHM-C"][3])


def test_paper_figures_from_live_runs(tmp_path):
    out = tmp_path / "figs"
    data = paper_figures.main(["--tiny", "--iters", "3", "--out", str(out), "--work-dir", str(tmp_path / "runs"),
                               "--rcnn-init", "", "--retinanet-init", ""])
    for name in ("libra_negative_iou.png", "ghm_gradient_density.png", "ghm_reweighting.png"):
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 300
        assert img.std() > 10  # something drawn, not a blank canvas
    saved = json.load(open(out / "figures.json"))
    assert saved["neg_iou_edges"] == pytest.approx([0.05 * i for i in range(11)])
    assert set(saved["neg_iou_hist"]) == set(paper_figures.NEG_IOU_RUNS)
    for label, hist in saved["neg_iou_hist"].items():
        assert len(hist) == 10 and sum(hist) == pytest.approx(1.0), label
    share = saved["share_of_negatives_above_0.05"]
    # IoU-balanced sampling draws more negatives away from IoU 0 than random sampling (Libra R-CNN, fig. 2)
    assert share["IoU-balanced sampling"] > share["random sampling"] + 0.05
    stats = saved["gradient_norm"]
    assert stats["edges"] == pytest.approx(np.linspace(0, 1, 31).tolist())
    assert len(stats["fraction"]) == 30 and sum(stats["fraction"]) == pytest.approx(1.0)
    assert all(b >= 0 for b in stats["beta"]) and max(stats["beta"]) > 0
    assert data["neg_iou_hist"] == saved["neg_iou_hist"]
