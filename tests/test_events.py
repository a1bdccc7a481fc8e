"""LibraGHM's statistics in Detectron2's EventStorage, metrics.json and TensorBoard events."""
import glob
import json
import math
import os

import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

import train_net
from conftest import config_path, get_config, tiny_batch, tiny_train_opts
from libraghm.events import NEG_IOU_EDGES, gradient_norm_histogram, negative_ious, storage_to_log
from libraghm.losses.ghm_loss import GHMC

IOU_BINS = [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(NEG_IOU_EDGES[:-1], NEG_IOU_EDGES[1:])]


def _train_step(model, batch, it=0):
    model.train()
    with EventStorage(it) as storage:
        losses = model(batch)
        sum(losses.values()).backward()
    return storage


def _fractions(storage, prefix, names):
    return [storage.history(f"{prefix}/{n}").latest() for n in names]


def test_storage_to_log_period():
    assert storage_to_log(20) is None  # no storage open
    with EventStorage(40) as s:
        assert storage_to_log(20) is s and storage_to_log(0) is None and storage_to_log(-1) is None
    with EventStorage(41):
        assert storage_to_log(20) is None


def test_negative_ious_use_the_matched_ground_truth():
    gt = Boxes(torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]))
    props = Boxes(torch.tensor([[0.0, 0, 10, 20], [25, 25, 35, 35], [50, 50, 60, 60]]))
    inst = Instances((64, 64), proposal_boxes=props, gt_boxes=gt[torch.tensor([0, 1, 0])],
                     gt_classes=torch.tensor([5, 5, 5]))
    no_gt = Instances((64, 64), proposal_boxes=props[:2], gt_classes=torch.tensor([5, 1]))
    ious = negative_ious([inst, no_gt], bg_label=5)
    assert torch.allclose(ious, torch.tensor([0.5, 25 / 175, 0.0, 0.0]))


@pytest.mark.parametrize("sampler", ["RandomSampler", "IoUBalancedSampler"])
def test_roi_heads_log_the_sampled_negatives_iou_histogram(sampler):
    cfg = get_config("Shapes-Detection/libra_sampling_faster_rcnn.yaml", "LIBRAGHM.ROI_SAMPLER.NAME", sampler,
                     "LIBRAGHM.LOG_PERIOD", 1)
    model = build_model(cfg)
    batch = tiny_batch(2)
    seen = {}
    orig = model.roi_heads.label_and_sample_proposals

    def spy(proposals, targets):
        seen["sampled"] = orig(proposals, targets)
        return seen["sampled"]

    model.roi_heads.label_and_sample_proposals = spy
    storage = _train_step(model, batch)
    frac = _fractions(storage, "roi_head/neg_iou_hist", IOU_BINS)
    assert math.isclose(sum(frac), 1.0, rel_tol=1e-9)
    # recompute from scratch: each sampled negative's largest IoU with any ground truth of its image
    expected = torch.zeros(len(IOU_BINS), dtype=torch.float64)
    for inst, x in zip(seen["sampled"], batch):
        neg = inst.gt_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES
        iou = pairwise_iou(inst.proposal_boxes[neg], x["instances"].gt_boxes).amax(dim=1)
        expected += torch.bincount((iou / 0.05).long().clamp(max=9), minlength=10)
    assert frac == pytest.approx((expected / expected.sum()).tolist(), abs=1e-9)


@pytest.mark.parametrize(
    "config", ["libra_faster_rcnn", "ohem_faster_rcnn", "ghm_retinanet", "bifpn_retinanet"]
)
def test_negative_log_period_is_rejected_when_the_model_is_built(config):
    cfg = get_config(f"Shapes-Detection/{config}.yaml", "LIBRAGHM.LOG_PERIOD", -5)
    with pytest.raises(ValueError, match=r"LIBRAGHM.LOG_PERIOD=-5 is not valid; it must be an integer >= 0"):
        build_model(cfg)


def test_log_period_zero_logs_nothing():
    model = build_model(get_config("Shapes-Detection/libra_faster_rcnn.yaml", "LIBRAGHM.LOG_PERIOD", 0))
    storage = _train_step(model, tiny_batch(2))
    assert not [k for k in storage.histories() if "neg_iou_hist" in k]
    model = build_model(get_config("Shapes-Detection/libra_faster_rcnn.yaml", "LIBRAGHM.LOG_PERIOD", 20))
    assert not [k for k in _train_step(model, tiny_batch(2), it=7).histories() if "neg_iou_hist" in k]
    assert [k for k in _train_step(model, tiny_batch(2), it=40).histories() if "neg_iou_hist" in k]


def test_ohem_logs_hard_and_candidate_negatives():
    model = build_model(get_config("Shapes-Detection/ohem_faster_rcnn.yaml", "LIBRAGHM.LOG_PERIOD", 1))
    storage = _train_step(model, tiny_batch(2))
    for prefix in ("roi_head/neg_iou_hist", "roi_head/cand_neg_iou_hist"):
        assert math.isclose(sum(_fractions(storage, prefix, IOU_BINS)), 1.0, rel_tol=1e-9)


def test_ghm_retinanet_logs_gradient_norm_histogram_and_weights():
    cfg = get_config("Shapes-Detection/ghm_retinanet.yaml", "LIBRAGHM.LOG_PERIOD", 1)
    model = build_model(cfg)
    batch = tiny_batch(2)
    captured = {}
    orig = model.losses

    def spy(anchors, pred_logits, gt_labels, *rest):
        captured["logits"] = torch.cat(pred_logits, dim=1).detach()
        captured["labels"] = torch.stack(gt_labels)
        return orig(anchors, pred_logits, gt_labels, *rest)

    model.losses = spy
    storage = _train_step(model, batch)
    bins = cfg.LIBRAGHM.GHMC.BINS
    names = [f"{k:02d}" for k in range(bins)]
    frac = torch.tensor(_fractions(storage, "ghm_c/g_hist", names), dtype=torch.float64)
    beta = torch.tensor(_fractions(storage, "ghm_c/beta", names), dtype=torch.float64)
    labels = captured["labels"]
    targets = (labels.unsqueeze(-1) == torch.arange(cfg.MODEL.RETINANET.NUM_CLASSES)).float()
    g = GHMC.gradient_norm(captured["logits"], targets)
    counts = gradient_norm_histogram(g, (labels >= 0).unsqueeze(-1), bins)
    assert torch.allclose(frac, counts / counts.sum())
    assert storage.history("ghm_c/num_samples").latest() == counts.sum()  # every valid (anchor, class)
    assert counts.sum() == (labels >= 0).sum() * cfg.MODEL.RETINANET.NUM_CLASSES
    # first update of the bias-corrected moving average: beta_k = N / (M * count_k) = 1 / (M * fraction_k)
    nonempty = frac > 0
    assert torch.allclose(beta[nonempty] * bins * frac[nonempty], torch.ones(int(nonempty.sum()), dtype=torch.float64))
    assert (beta[~nonempty] == 0).all()
    r_names = [f"{k:02d}" for k in range(cfg.LIBRAGHM.GHMR.BINS)]
    assert math.isclose(sum(_fractions(storage, "ghm_r/g_hist", r_names)), 1.0, rel_tol=1e-9)


def test_bifpn_logs_normalised_fusion_weights():
    cfg = get_config("Shapes-Detection/bifpn_retinanet.yaml", "LIBRAGHM.LOG_PERIOD", 1)
    model = build_model(cfg)
    with torch.no_grad():
        for node in model.backbone.neck.layers[0].nodes:
            node.fusion.weight.copy_(torch.arange(1.0, node.fusion.weight.numel() + 1))
    storage = _train_step(model, tiny_batch(2))
    keys = [k for k in storage.histories() if k.startswith("bifpn/")]
    layers, nodes = len(model.backbone.neck.layers), len(model.backbone.neck.layers[0].nodes)
    num_inputs = sum(len(n.input_ids) for n in model.backbone.neck.layers[0].nodes)
    assert len(keys) == layers * num_inputs and nodes >= 2
    # layer 0 node 0 had raw weights (1, 2): fast normalised fusion gives w_i / (3 + 1e-4)
    first = sorted(k for k in keys if k.startswith("bifpn/layer0/node0_"))
    assert [storage.history(k).latest() for k in first] == pytest.approx([1 / 3.0001, 2 / 3.0001], rel=1e-6)


SHAPES = sorted(
    os.path.splitext(f)[0] for f in os.listdir(config_path("Shapes-Detection")) if not f.startswith("Base-")
)


def _own_scalar_prefixes(cfg):
    """The LibraGHM statistics a config's model must log."""
    prefixes = []
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.ROI_HEADS.NAME in ("LibraROIHeads", "OHEMROIHeads"):
        prefixes.append("roi_head/neg_iou_hist/")
    if cfg.MODEL.ROI_HEADS.NAME == "OHEMROIHeads":
        prefixes.append("roi_head/cand_neg_iou_hist/")
    if cfg.MODEL.META_ARCHITECTURE == "GHMRetinaNet":
        prefixes.append("ghm_c/g_hist/")
    if cfg.MODEL.PROPOSAL_GENERATOR.NAME == "GHMRPN":
        prefixes.append("rpn_ghm_c/g_hist/")
    if cfg.MODEL.BACKBONE.NAME == "build_bifpn_backbone":
        prefixes.append("bifpn/layer0/")
    return prefixes


@pytest.mark.parametrize("config", SHAPES)
def test_training_writes_metrics_eta_and_tensorboard_events(tmp_path, config):
    """Every built-in-dataset model: Detectron2's printer (ETA), metrics.json and TensorBoard get its scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    opts = tiny_train_opts(out, 3, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "LIBRAGHM.LOG_PERIOD", 1)
    cfg = train_net.setup(
        default_argument_parser().parse_args(["--config-file", config_path(f"Shapes-Detection/{config}.yaml"), *opts])
    )
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    keys = set().union(*rows)
    assert "total_loss" in keys and "eta_seconds" in keys and "lr" in keys
    log = open(out / "log.txt").read()
    assert "eta: " in log and "total_loss: " in log  # Detectron2's CommonMetricPrinter
    events = glob.glob(str(out / "events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(events[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "total_loss" in tags
    for prefix in _own_scalar_prefixes(cfg):
        assert any(k.startswith(prefix) for k in keys), (prefix, sorted(keys))
        assert any(t.startswith(prefix) for t in tags), prefix


@pytest.mark.parametrize("config", ["libra_faster_rcnn", "ohem_faster_rcnn", "ghm_retinanet"])
def test_statistics_of_images_without_ground_truth_are_finite(config):
    """No ground truth anywhere: every negative has IoU 0, GHM-R has no samples; nothing is NaN."""
    model = build_model(get_config(f"Shapes-Detection/{config}.yaml", "LIBRAGHM.LOG_PERIOD", 1))
    storage = _train_step(model, tiny_batch(2, with_gt=(False, False)))
    logged = {k: h.latest() for k, h in storage.histories().items()}
    assert all(math.isfinite(v) for v in logged.values()), logged
    if config != "ghm_retinanet":
        assert logged["roi_head/neg_iou_hist/0.00-0.05"] == 1.0
    else:
        assert logged["ghm_r/num_samples"] == 0 and sum(logged[f"ghm_r/g_hist/{k:02d}"] for k in range(10)) == 0
