"""Any sampler with any loss with any neck: the cross product builds from yaml keys and trains.

Every sampler of each sampling head x every loss of each part (registered ones, plus a user's own
sampler and losses registered here with one decorator each), with the FPN, BFP and BiFPN necks in
turn, at a tiny size: one training step gives finite losses and finite gradients, and the model is
made of the parts the keys named.
"""
import itertools

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.sampling import subsample_labels
from detectron2.utils.events import EventStorage

from conftest import get_config, tiny_batch
from libraghm.losses import (
    BOX_REG_LOSS_REGISTRY,
    CLASSIFICATION_LOSS_REGISTRY,
    BoxRegressionLoss,
    ClassificationLoss,
    dense_box_regression_deltas,
)
from libraghm.sampling import SAMPLER_REGISTRY, Sampler


class HalfQuotaSampler(Sampler):
    """A user's own sampler: Detectron2's random sampling of half the quota."""

    def __call__(self, labels, num_samples, positive_fraction, bg_label, **match_quality):
        return subsample_labels(labels, max(num_samples // 2, 1), positive_fraction, bg_label)


class PlainL1Loss(BoxRegressionLoss):
    """A user's own box loss: L1 on the deltas."""

    name = "plain_l1"

    def forward(self, anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask):
        pred, target = dense_box_regression_deltas(
            anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask
        )
        return (pred - target).abs().sum()

    def per_box(self, proposal_boxes, gt_boxes, pred_deltas, box2box_transform):
        return (pred_deltas - box2box_transform.get_deltas(proposal_boxes, gt_boxes)).abs().sum(1)


class SquaredErrorLoss(ClassificationLoss):
    """A user's own classification loss: squared error of the probabilities."""

    name = "squared_error"

    def forward(self, logits, targets, valid, level_sizes=None):
        return ((logits[valid].sigmoid() - targets[valid]) ** 2).sum()


@pytest.fixture(scope="module", autouse=True)
def user_parts():
    """A user's own sampler and losses, each registered with the one decorator (``register()``)
    for this module's tests and removed afterwards, so that other tests see the stock registries."""
    registered = [(SAMPLER_REGISTRY, SAMPLER_REGISTRY.register()(HalfQuotaSampler).__name__),
                  (BOX_REG_LOSS_REGISTRY, BOX_REG_LOSS_REGISTRY.register()(PlainL1Loss).name),
                  (CLASSIFICATION_LOSS_REGISTRY,
                   CLASSIFICATION_LOSS_REGISTRY.register()(SquaredErrorLoss).name)]
    yield
    for registry, name in registered:
        del registry._obj_map[name]


ROI_SAMPLERS = ["RandomSampler", "IoUBalancedSampler", "InstanceBalancedSampler", "NoSampling",
                "OHEMSampler", "HalfQuotaSampler"]
RPN_SAMPLERS = ["RandomSampler", "IoUBalancedSampler", "InstanceBalancedSampler", "NoSampling",
                "HalfQuotaSampler"]
BOX_LOSSES = ["smooth_l1", "giou", "diou", "ciou", "balanced_l1", "ghm_r", "huber", "plain_l1"]
CLS_LOSSES = ["bce", "focal", "ghm_c", "squared_error"]
NECKS = ["fpn", "bfp", "bifpn"]

TINY = [
    "MODEL.SMALL_RESNET.WIDTHS", [8, 16, 24, 32], "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.BIFPN.WIDTH", 32, "MODEL.BIFPN.REPEATS", 1, "MODEL.BIFPN.NORM", "GN",
    "MODEL.BIFPN.GN_NUM_GROUPS", 8, "MODEL.BIFPN.SIZE_DIVISIBILITY", 32,
    "MODEL.BIFPN.BOTTOM_UP", "build_small_resnet_backbone", "MODEL.BFP.REFINE", "non_local",
]


def _neck(neck, retinanet):
    if neck == "bfp":
        inner = "build_small_resnet_retinanet_fpn_backbone" if retinanet else "build_small_resnet_fpn_backbone"
        return ["MODEL.BACKBONE.NAME", "build_bfp_backbone", "MODEL.BFP.FPN_BUILDER", inner]
    if neck == "bifpn":
        levels = (["res3", "res4", "res5"], 7) if retinanet else (["res2", "res3", "res4", "res5"], 6)
        return ["MODEL.BACKBONE.NAME", "build_bifpn_backbone", "MODEL.BIFPN.IN_FEATURES", levels[0],
                "MODEL.BIFPN.TOP_LEVEL", levels[1]]
    return []


def _rcnn_cases():
    rpn = list(itertools.product(RPN_SAMPLERS, CLS_LOSSES, BOX_LOSSES))
    roi = list(itertools.product(ROI_SAMPLERS, BOX_LOSSES))
    # every RPN combination once, every ROI combination at least once, necks in turn
    return [(rpn[i], roi[i % len(roi)], NECKS[i % len(NECKS)]) for i in range(len(rpn))]


def _train_step(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(tiny_batch(2, height=64, width=80))
    total = sum(losses.values())
    total.backward()
    assert all(torch.isfinite(v) for v in losses.values()), losses
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return model, losses


@pytest.mark.parametrize("rpn,roi,neck", _rcnn_cases(), ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_faster_rcnn_any_sampler_any_loss_any_neck(rpn, roi, neck):
    (rpn_sampler, objectness, rpn_box), (roi_sampler, roi_box) = rpn, roi
    cfg = get_config(
        "Shapes-Detection/faster_rcnn_small_R_FPN.yaml", *TINY, *_neck(neck, False),
        "MODEL.ROI_BOX_HEAD.FC_DIM", 32, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.PROPOSAL_GENERATOR.NAME", "LibraGHMRPN", "MODEL.RPN.SAMPLER", rpn_sampler,
        "MODEL.RPN.OBJECTNESS_LOSS_TYPE", objectness, "MODEL.RPN.BBOX_REG_LOSS_TYPE", rpn_box,
        "MODEL.ROI_HEADS.NAME", "LibraGHMROIHeads", "MODEL.ROI_HEADS.SAMPLER", roi_sampler,
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", roi_box,
    )
    model, losses = _train_step(cfg)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    rpn_module, heads = model.proposal_generator, model.roi_heads
    assert type(rpn_module.sampler).__name__ == rpn_sampler
    assert rpn_module.objectness_loss.name == objectness and rpn_module.box_reg_loss.name == rpn_box
    assert type(heads.sampler).__name__ == roi_sampler
    assert heads.box_predictor.box_regression_loss.name == roi_box
    assert type(model.backbone).__name__ == {"fpn": "FPN", "bfp": "BalancedFeaturePyramid",
                                             "bifpn": "BiFPN"}[neck]


@pytest.mark.parametrize("cls_loss,box_loss,neck", [
    (c, b, NECKS[i % len(NECKS)]) for i, (c, b) in enumerate(itertools.product(CLS_LOSSES, BOX_LOSSES))
])
def test_retinanet_any_loss_any_neck(cls_loss, box_loss, neck):
    cfg = get_config(
        "Shapes-Detection/retinanet_small_R_FPN.yaml", *TINY, *_neck(neck, True),
        "MODEL.RETINANET.NUM_CONVS", 1, "MODEL.META_ARCHITECTURE", "LibraGHMRetinaNet",
        "MODEL.RETINANET.CLS_LOSS_TYPE", cls_loss, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", box_loss,
    )
    model, losses = _train_step(cfg)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert model.cls_loss.name == cls_loss and model.box_reg_loss.name == box_loss


def test_every_registered_part_is_in_the_cross_product():
    """A newly registered sampler or loss must be added to the lists above."""
    assert set(ROI_SAMPLERS) | set(RPN_SAMPLERS) == {name for name, _ in SAMPLER_REGISTRY}
    assert set(BOX_LOSSES) == {name for name, _ in BOX_REG_LOSS_REGISTRY}
    assert set(CLS_LOSSES) == {name for name, _ in CLASSIFICATION_LOSS_REGISTRY}
