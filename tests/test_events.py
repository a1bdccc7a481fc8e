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
from detectron2.utils.events import EventStorage, TensorboardXWriter

import train_net
from conftest import config_path, get_config, tiny_batch, tiny_train_opts
from libraghm.events import (
    NEG_IOU_EDGES,
    gradient_norm_histogram,
    log_negative_iou_histogram,
    negative_ious,
    storage_to_log,
)
from libraghm.losses.ghm_loss import GHMC

# Turns the built-in-dataset Faster R-CNN's RPN into GHM's RPN: GHM-C objectness over all valid anchors.
GHM_RPN = ["MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.OBJECTNESS_LOSS_TYPE", "ghm_c",
           "MODEL.RPN.SAMPLER", "NoSampling"]

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


def test_negative_iou_histogram_counts_non_finite_ious_as_zero(tmp_path):
    """NaN (0/0 of zero-area boxes), +-Inf and out-of-range IoUs: no error, no NaN, in metrics and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    nan, inf = float("nan"), float("inf")
    ious = torch.tensor([nan, inf, -inf, -3.0, 0.0, 0.07, 0.49, 0.5, 1e30])
    with EventStorage(0) as storage:
        log_negative_iou_histogram(storage, "roi_head/neg_iou_hist", ious)
        frac = _fractions(storage, "roi_head/neg_iou_hist", IOU_BINS)
        # nan, inf, -inf, -3 and 0 in [0, 0.05); 0.07 in [0.05, 0.1); 0.49, 0.5 and 1e30 (clamped to 1) in the last bin
        assert frac == pytest.approx([5 / 9, 1 / 9, 0, 0, 0, 0, 0, 0, 0, 3 / 9], abs=1e-12)
        writer = TensorboardXWriter(str(tmp_path))
        writer.write()
        writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    (hist,) = acc.Histograms("roi_head/neg_iou_hist")
    values = hist.histogram_value
    assert values.num == 9 and values.min == 0.0 and values.max == 1.0
    assert all(math.isfinite(v) for v in (values.sum, values.sum_squares, *values.bucket, *values.bucket_limit))
    assert sum(values.bucket) == 9


def test_zero_area_proposal_and_ground_truth_give_a_finite_histogram():
    """A zero-area RoI on a zero-area ground truth has IoU 0/0 = NaN; it is logged as a negative of IoU 0."""
    gt = Boxes(torch.tensor([[5.0, 5, 5, 5], [20, 20, 30, 30]]))
    props = Boxes(torch.tensor([[5.0, 5, 5, 5], [20, 20, 30, 40], [3.0, 3, 3, 3]]))
    inst = Instances((64, 64), proposal_boxes=props, gt_boxes=gt[torch.tensor([0, 1, 1])],
                     gt_classes=torch.tensor([5, 5, 5]))
    ious = negative_ious([inst], bg_label=5)
    assert torch.isnan(ious[0]) and ious[1:].tolist() == pytest.approx([0.5, 0.0])
    with EventStorage(0) as storage:
        log_negative_iou_histogram(storage, "roi_head/neg_iou_hist", ious)
        frac = _fractions(storage, "roi_head/neg_iou_hist", IOU_BINS)
    assert frac == pytest.approx([2 / 3] + [0.0] * 8 + [1 / 3], abs=1e-12)


@pytest.mark.parametrize("sampler", ["RandomSampler", "IoUBalancedSampler"])
def test_roi_heads_with_a_zero_area_ground_truth_log_finite_statistics(sampler):
    """Through LibraGHMROIHeads: the zero-area ground truth joins the proposals and is matched with IoU 0/0."""
    cfg = get_config("Shapes-Detection/libra_sampling_faster_rcnn.yaml", "MODEL.ROI_HEADS.SAMPLER", sampler,
                     "LIBRAGHM.LOG_PERIOD", 1)
    roi_heads = build_model(cfg).roi_heads
    gt = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[10.0, 10, 10, 10], [30, 30, 50, 50]])),
                   gt_classes=torch.tensor([0, 1]))
    boxes = torch.tensor([[10.0, 10, 10, 10], [32, 30, 50, 52], [0, 0, 8, 8], [40, 0, 60, 20]])
    proposals = Instances((64, 64), proposal_boxes=Boxes(boxes), objectness_logits=torch.zeros(4))
    with EventStorage(0) as storage:
        (sampled,) = roi_heads.label_and_sample_proposals([proposals], [gt])
    bg = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert torch.isnan(negative_ious([sampled], bg)).any()  # the case being tested does occur
    logged = {k: h.latest() for k, h in storage.histories().items() if "neg_iou_hist" in k}
    assert len(logged) == len(IOU_BINS) and all(math.isfinite(v) for v in logged.values())
    assert sum(logged.values()) == pytest.approx(1.0)


def test_gradient_norm_histogram_leaves_out_non_finite_norms():
    g = torch.tensor([[float("nan"), 0.05, float("inf")], [1.0, 0.5, 0.0]])
    assert gradient_norm_histogram(g, None, 10).tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    keep = torch.tensor([[True], [False]])
    assert gradient_norm_histogram(g, keep, 10).tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("sampler", ["RandomSampler", "IoUBalancedSampler"])
def test_roi_heads_log_the_sampled_negatives_iou_histogram(sampler):
    cfg = get_config("Shapes-Detection/libra_sampling_faster_rcnn.yaml", "MODEL.ROI_HEADS.SAMPLER", sampler,
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
    with pytest.raises(ValueError, match=r"LIBRAGHM\.LOG_PERIOD = -5 is invalid: expected an integer >= 0"):
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


def _spy_losses(module, captured):
    """Wrap ``module.losses`` (RetinaNet or RPN: (anchors, logits, gt_labels, ...)) to keep its inputs."""
    orig = module.losses

    def spy(anchors, pred_logits, gt_labels, *rest):
        captured["logits"] = torch.cat(pred_logits, dim=1).detach()
        captured["labels"] = torch.stack(gt_labels)
        return orig(anchors, pred_logits, gt_labels, *rest)

    module.losses = spy


@pytest.mark.parametrize("bias_correction", [False, True])
def test_ghm_retinanet_logs_gradient_norm_histogram_and_weights(bias_correction):
    cfg = get_config("Shapes-Detection/ghm_retinanet.yaml", "LIBRAGHM.LOG_PERIOD", 1,
                     "MODEL.GHM_C.BIAS_CORRECTION", bias_correction)
    model = build_model(cfg)
    captured = {}
    _spy_losses(model, captured)
    storage = _train_step(model, tiny_batch(2))
    bins = cfg.MODEL.GHM_C.BINS
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
    # first update of the moving average S_k = (1 - m) count_k: beta_k = N / (M * S_k) =
    # 1 / (M * (1 - m) * fraction_k) as in the paper; the bias-corrected S_k / (1 - m) gives 1 / (M * fraction_k)
    m = cfg.MODEL.GHM_C.MOMENTUM
    expected = 1.0 if bias_correction else 1.0 / (1.0 - m)
    nonempty = frac > 0
    assert torch.allclose(beta[nonempty] * bins * frac[nonempty],
                          torch.full((int(nonempty.sum()),), expected, dtype=torch.float64))
    assert (beta[~nonempty] == 0).all()
    r_names = [f"{k:02d}" for k in range(cfg.MODEL.GHM_R.BINS)]
    assert math.isclose(sum(_fractions(storage, "ghm_r/g_hist", r_names)), 1.0, rel_tol=1e-9)
    num_images = labels.shape[0]
    positives = ((labels >= 0) & (labels != cfg.MODEL.RETINANET.NUM_CLASSES)).sum()
    assert storage.history("num_pos_anchors").latest() == pytest.approx(float(positives) / num_images)


def test_retinanet_with_focal_loss_logs_a_30_bin_histogram_and_positives_at_the_log_period():
    """Not GHM-C: the classification gradient-norm histogram is still logged (30 bins, no weights), and
    num_pos_anchors, only at the log period."""
    cfg = get_config("Shapes-Detection/retinanet_balanced_l1.yaml", "LIBRAGHM.LOG_PERIOD", 20)
    assert cfg.MODEL.META_ARCHITECTURE == "LibraGHMRetinaNet" and cfg.MODEL.RETINANET.CLS_LOSS_TYPE == "focal"
    model = build_model(cfg)
    captured = {}
    _spy_losses(model, captured)
    batch = tiny_batch(2)
    quiet = _train_step(model, batch, it=7).histories()
    assert not [k for k in quiet if k.startswith(("ghm_c/", "ghm_r/")) or k == "num_pos_anchors"], sorted(quiet)
    storage = _train_step(model, batch, it=40)
    logged = storage.histories()
    names = [f"{k:02d}" for k in range(30)]
    assert sorted(k for k in logged if k.startswith("ghm_c/g_hist/")) == [f"ghm_c/g_hist/{n}" for n in names]
    assert not [k for k in logged if k.startswith(("ghm_c/beta/", "ghm_r/"))]
    labels = captured["labels"]
    targets = (labels.unsqueeze(-1) == torch.arange(cfg.MODEL.RETINANET.NUM_CLASSES)).float()
    counts = gradient_norm_histogram(GHMC.gradient_norm(captured["logits"], targets), (labels >= 0).unsqueeze(-1), 30)
    frac = torch.tensor(_fractions(storage, "ghm_c/g_hist", names), dtype=torch.float64)
    assert torch.allclose(frac, counts / counts.sum())
    positives = ((labels >= 0) & (labels != cfg.MODEL.RETINANET.NUM_CLASSES)).sum()
    assert positives > 0
    assert storage.history("num_pos_anchors").latest() == pytest.approx(float(positives) / labels.shape[0])


def test_ghm_rpn_logs_objectness_gradient_norms_of_all_valid_anchors():
    """LibraGHMRPN with GHM-C objectness and no anchor sampling (GHM's RPN): rpn_ghm_c/* over every valid anchor."""
    cfg = get_config("Shapes-Detection/faster_rcnn_small_R_FPN.yaml", *GHM_RPN, "LIBRAGHM.LOG_PERIOD", 1)
    model = build_model(cfg)
    captured = {}
    _spy_losses(model.proposal_generator, captured)
    storage = _train_step(model, tiny_batch(2))
    labels = captured["labels"]  # (N, R) in {-1, 0, 1}, after (no) sampling
    assert (labels == 0).sum() > cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE * labels.shape[0]  # nothing subsampled
    bins = cfg.MODEL.GHM_C.BINS
    names = [f"{k:02d}" for k in range(bins)]
    g = GHMC.gradient_norm(captured["logits"].unsqueeze(-1), (labels == 1).float().unsqueeze(-1))
    counts = gradient_norm_histogram(g, (labels >= 0).unsqueeze(-1), bins)
    frac = torch.tensor(_fractions(storage, "rpn_ghm_c/g_hist", names), dtype=torch.float64)
    assert torch.allclose(frac, counts / counts.sum())
    assert storage.history("rpn_ghm_c/num_samples").latest() == (labels >= 0).sum()
    beta = torch.tensor(_fractions(storage, "rpn_ghm_c/beta", names), dtype=torch.float64)
    nonempty = frac > 0
    # first update (see above)
    expected = 1.0 if cfg.MODEL.GHM_C.BIAS_CORRECTION else 1.0 / (1.0 - cfg.MODEL.GHM_C.MOMENTUM)
    assert torch.allclose(beta[nonempty] * bins * frac[nonempty],
                          torch.full((int(nonempty.sum()),), expected, dtype=torch.float64))
    assert storage.history("rpn/num_pos_anchors").latest() == pytest.approx(float((labels == 1).sum()) / 2)
    assert storage.history("rpn/num_neg_anchors").latest() == pytest.approx(float((labels == 0).sum()) / 2)


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
    os.path.splitext(f)[0] for f in os.listdir(config_path("Shapes-Detection"))
    if f.endswith(".yaml") and not f.startswith("Base-")
)
# (config, extra overrides): every built-in-dataset config, plus GHM's RPN (no config of its own).
RUNS = [(c, []) for c in SHAPES] + [("faster_rcnn_small_R_FPN", GHM_RPN)]


def _own_scalar_prefixes(cfg):
    """The LibraGHM statistics a config's model must log."""
    prefixes = []
    rcnn = cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    if rcnn and cfg.MODEL.ROI_HEADS.NAME == "LibraGHMROIHeads":
        prefixes.append("roi_head/neg_iou_hist/")
        if cfg.MODEL.ROI_HEADS.SAMPLER == "OHEMSampler":
            prefixes.append("roi_head/cand_neg_iou_hist/")
    if cfg.MODEL.META_ARCHITECTURE in ("LibraGHMRetinaNet", "EfficientDet"):
        prefixes += ["num_pos_anchors", "ghm_c/g_hist/", "ghm_c/num_samples"]  # with any classification loss
        if cfg.MODEL.RETINANET.CLS_LOSS_TYPE == "ghm_c":
            prefixes.append("ghm_c/beta/")
        if cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE == "ghm_r":
            prefixes.append("ghm_r/g_hist/")
    if rcnn and cfg.MODEL.PROPOSAL_GENERATOR.NAME == "LibraGHMRPN":
        prefixes.append("rpn/num_pos_anchors")
        if cfg.MODEL.RPN.OBJECTNESS_LOSS_TYPE == "ghm_c":
            prefixes += ["rpn_ghm_c/g_hist/", "rpn_ghm_c/beta/"]
    if cfg.MODEL.BACKBONE.NAME == "build_bifpn_backbone" and cfg.MODEL.BIFPN.FUSION != "sum":  # no weights
        prefixes.append("bifpn/layer0/")
    return prefixes


def test_expected_statistics_cover_every_logging_part():
    """The table above is not vacuous: across RUNS every LibraGHM statistic is expected somewhere."""
    expected = set()
    for config, extra in RUNS:
        expected.update(_own_scalar_prefixes(get_config(f"Shapes-Detection/{config}.yaml", *extra)))
    assert {"roi_head/neg_iou_hist/", "roi_head/cand_neg_iou_hist/", "num_pos_anchors", "ghm_c/g_hist/",
            "ghm_c/beta/", "ghm_r/g_hist/", "rpn/num_pos_anchors", "rpn_ghm_c/g_hist/", "bifpn/layer0/"} <= expected


@pytest.mark.parametrize("config,extra", RUNS, ids=[c + ("+ghm_rpn" if e else "") for c, e in RUNS])
def test_training_writes_metrics_eta_and_tensorboard_events(tmp_path, config, extra):
    """Every built-in-dataset model: Detectron2's printer (ETA), metrics.json and TensorBoard get its scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    opts = tiny_train_opts(out, 3, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "LIBRAGHM.LOG_PERIOD", 1, *extra)
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


@pytest.mark.parametrize("config", ["libra_faster_rcnn", "ohem_faster_rcnn", "ghm_retinanet", "ghm_rpn"])
def test_statistics_of_images_without_ground_truth_are_finite(config):
    """No ground truth anywhere: every negative has IoU 0, GHM-R has no samples; nothing is NaN."""
    opts, ghm_rpn = ["LIBRAGHM.LOG_PERIOD", 1], config == "ghm_rpn"
    if ghm_rpn:
        config, opts = "libra_faster_rcnn", opts + GHM_RPN
    model = build_model(get_config(f"Shapes-Detection/{config}.yaml", *opts))
    storage = _train_step(model, tiny_batch(2, with_gt=(False, False)))
    logged = {k: h.latest() for k, h in storage.histories().items()}
    assert all(math.isfinite(v) for v in logged.values()), logged
    if config != "ghm_retinanet":
        assert logged["roi_head/neg_iou_hist/0.00-0.05"] == 1.0
    else:
        assert logged["ghm_r/num_samples"] == 0 and sum(logged[f"ghm_r/g_hist/{k:02d}"] for k in range(10)) == 0
    if ghm_rpn:  # every anchor inside the image is a valid negative
        assert logged["rpn_ghm_c/num_samples"] > 0 and logged["rpn/num_pos_anchors"] == 0
