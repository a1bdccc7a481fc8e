"""
What the LazyConfig (Python) versions of the Shapes-Detection configs share: the two stock models
of Base-Shapes-RCNN-FPN.yaml and Base-Shapes-RetinaNet.yaml (small ResNet from scratch, GroupNorm
FPN, small anchors, 5 classes), the built-in dataset's loaders and COCO evaluation, SGD (with
LibraGHM's whole-model gradient clipping, off unless a config sets it), the step schedule and the
``train`` settings of tools/lazyconfig_train_net.py.

A config file imports what it needs and changes it, e.g.

    from .common import dataloader, faster_rcnn, lr_multiplier, optimizer, train
    model = faster_rcnn()
    model.roi_heads.num_classes = 3

To train on your own COCO-format data, register it in the config file (e.g.
``libraghm.data.register_coco_dataset("my_train", "ann/train.json", "images/train")``) and set
``dataloader.train.dataset.names``, ``dataloader.test.dataset.names`` and the number of classes.

Every value equals the yaml config's; tests/test_lazy_config.py checks that the models are the
same (parameters, buffers and every setting of every part).
"""
import torch
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

from libraghm.backbone.small_resnet import make_small_resnet
from libraghm.data.resumable_loader import build_resumable_loader
from libraghm.solver import add_full_model_gradient_clipping

NUM_CLASSES = 5  # circle, rectangle, triangle, star, cross
FPN_CHANNELS = 64
DETECTIONS_PER_IMAGE = 50


def _small_resnet(out_features):
    # MODEL.SMALL_RESNET (widths, blocks) and MODEL.RESNETS.NORM "BN", trained from scratch.
    return L(make_small_resnet)(
        widths=[16, 32, 64, 128],
        blocks=[1, 1, 1, 1],
        in_channels=3,
        norm="BN",
        out_features=out_features,
        freeze_at=0,
    )


# ------------------------------------------------------------------------------------------------
# Models: Detectron2's lazy models (common/models/*.py of its model zoo), resized for the dataset
# ------------------------------------------------------------------------------------------------
def faster_rcnn():
    """Faster R-CNN, FPN P2-P6 (faster_rcnn_small_R_FPN.yaml)."""
    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    for key in ("mask_in_features", "mask_pooler", "mask_head"):  # MODEL.MASK_ON: False
        del model.roi_heads[key]
    model.backbone.bottom_up = _small_resnet(["res2", "res3", "res4", "res5"])
    model.backbone.out_channels = FPN_CHANNELS
    model.backbone.norm = "GN"
    rpn = model.proposal_generator
    rpn.head.in_channels = FPN_CHANNELS
    rpn.anchor_generator.sizes = [[12], [24], [48], [96], [192]]
    rpn.batch_size_per_image = 128
    rpn.pre_nms_topk = (1000, 500)  # (training, test)
    rpn.post_nms_topk = (256, 200)
    roi_heads = model.roi_heads
    roi_heads.num_classes = NUM_CLASSES
    roi_heads.batch_size_per_image = 128
    roi_heads.box_head.input_shape = ShapeSpec(channels=FPN_CHANNELS, height=7, width=7)
    roi_heads.box_head.fc_dims = [256, 256]
    roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
    roi_heads.box_predictor.test_topk_per_image = DETECTIONS_PER_IMAGE
    roi_heads.box_predictor.loss_weight = {"loss_box_reg": 1.0}
    model.pixel_mean = [127.5, 127.5, 127.5]
    model.pixel_std = [64.0, 64.0, 64.0]
    return model


def retinanet():
    """RetinaNet, FPN P3-P7 (retinanet_small_R_FPN.yaml)."""
    model = model_zoo.get_config("common/models/retinanet.py").model
    model.backbone.bottom_up = _small_resnet(["res3", "res4", "res5"])
    model.backbone.out_channels = FPN_CHANNELS
    model.backbone.norm = "GN"
    model.backbone.top_block.in_channels = "${..bottom_up.widths[3]}"  # res5's width
    model.head.input_shape = [ShapeSpec(channels=FPN_CHANNELS)] * 5
    model.head.conv_dims = [FPN_CHANNELS, FPN_CHANNELS]
    model.head.norm = "GN"
    model.anchor_generator.sizes = [
        [12, 15, 19], [24, 30, 38], [48, 60, 76], [96, 121, 152], [192, 242, 305]
    ]
    model.num_classes = NUM_CLASSES
    model.smooth_l1_beta = 0.0
    model.test_topk_candidates = 500
    model.max_detections_per_image = DETECTIONS_PER_IMAGE
    model.pixel_mean = [127.5, 127.5, 127.5]
    model.pixel_std = [64.0, 64.0, 64.0]
    return model


# ------------------------------------------------------------------------------------------------
# Data: the built-in shapes dataset (generated on first use), COCO metrics
# ------------------------------------------------------------------------------------------------
dataloader = OmegaConf.create()
# LibraGHM's exactly resumable loader (LIBRAGHM.EXACT_RESUME in yaml): same data, mapper and batches
# as Detectron2's build_detection_train_loader, with the order and augmentations derived from the
# seed and the iteration (libraghm/data/resumable_loader.py).
dataloader.train = L(build_resumable_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=[256], max_size=400, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True, vertical=False),
        ],
        image_format="BGR",
        use_instance_mask=False,
    ),
    total_batch_size=4,
    num_workers=1,
    seed="${...train.seed}",
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=256, max_size=400, sample_style="choice"),
        ],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=1,
)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}/inference",
)

# ------------------------------------------------------------------------------------------------
# Optimisation
# ------------------------------------------------------------------------------------------------
# SGD as the yaml configs' SOLVER (momentum 0.9, weight decay 1e-4, none on norm layers); the
# script sets optimizer.optimizer.params.model. The wrapper (LIBRAGHM.CLIP_GRAD_NORM in yaml) makes
# optimizer.step() first clip the norm of all gradients together (0 = off, the optimizer is
# returned unchanged).
optimizer = L(add_full_model_gradient_clipping)(
    max_norm=0.0,
    optimizer=L(torch.optim.SGD)(
        params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
        lr=0.02,
        momentum=0.9,
        weight_decay=1e-4,
    ),
)

# The LR factor as a function of training progress: linear warm-up over the first 100 of 1800
# iterations from 0.001, then x0.1 at 1400 and 1700 (SOLVER.WARMUP_ITERS / STEPS). The positions
# are fractions of train.max_iter, so a shorter run keeps the shape of the schedule.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[1400, 1700], num_updates=1800
    ),
    warmup_length=100 / 1800,
    warmup_factor=0.001,
    warmup_method="linear",
)

# Settings of tools/lazyconfig_train_net.py.
train = dict(
    output_dir="./output/lazy",
    init_checkpoint="",  # weights to start from (training) or to evaluate (--eval-only)
    max_iter=1800,
    amp=dict(enabled=False),  # mixed precision (AMPTrainer)
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=600, max_to_keep=100),
    eval_period=0,  # 0: evaluate once, after the last iteration
    log_period=20,
    # LIBRAGHM.FINITE_CHECK_PERIOD: stop if a parameter or buffer turns NaN/Inf, checked every
    # this many iterations and after the last one (0: only checkpoints, which are always checked)
    finite_check_period=20,
    device="cuda",  # the script falls back to "cpu" when CUDA is not available
    seed=-1,  # < 0: a random seed
)
