"""
Libra R-CNN on the built-in shapes dataset, as a LazyConfig: the Python version of
../libra_faster_rcnn.yaml (same model, data, schedule; its parts are passed as objects).

Faster R-CNN with all three Libra parts:
- the small ResNet + FPN (P2-P6) wrapped in a Balanced Feature Pyramid (reference level P4,
  non-local refine);
- IoU-balanced sampling in the ROI heads (negatives spread evenly over 3 IoU bins, positives
  evenly over ground-truth boxes); the RPN is Detectron2's own;
- the balanced L1 loss in the ROI box predictor.

    python tools/lazyconfig_train_net.py --config-file configs/Shapes-Detection/lazy/libra_faster_rcnn.py
"""
from detectron2.config import LazyCall as L

from libraghm.backbone import BalancedFeaturePyramid
from libraghm.losses import BalancedL1Loss
from libraghm.modeling import LibraGHMFastRCNNOutputLayers, LibraGHMROIHeads
from libraghm.sampling import IoUBalancedSampler

from .common import dataloader, faster_rcnn, lr_multiplier, optimizer, train

model = faster_rcnn()  # the stock model of the yaml config's _BASE_

model.backbone = L(BalancedFeaturePyramid)(
    fpn=model.backbone,
    refine_type="non_local",
    refine_level=-1,  # the level at stride 16 (P4)
    resize_mode="strided",
    attention="sdpa",
)

model.roi_heads._target_ = LibraGHMROIHeads
model.roi_heads.sampler = L(IoUBalancedSampler)(
    num_bins=3,
    floor_thresh=-1.0,  # no floor group
    floor_fraction=0.0,
    positives="instance_balanced",
    mmdet_compat=False,
)
model.roi_heads.log_period = 20  # LIBRAGHM.LOG_PERIOD: the sampled negatives' IoU histogram

model.roi_heads.box_predictor._target_ = LibraGHMFastRCNNOutputLayers
model.roi_heads.box_predictor.box_reg_loss = L(BalancedL1Loss)(
    alpha=0.5, gamma=1.5, beta=1.0, mmdet_compat=False
)

optimizer.optimizer.lr = 0.02
train.output_dir = "./output/lazy/libra_faster_rcnn"
