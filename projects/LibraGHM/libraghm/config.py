"""LibraGHM's config keys, declared in one place with their defaults.

Every key LibraGHM reads lives under ``cfg.LIBRAGHM``. Call :func:`add_libraghm_config` on a
Detectron2 config before merging a LibraGHM yaml file into it.
"""
from detectron2.config import CfgNode as CN


def add_libraghm_config(cfg):
    """
    Add LibraGHM's config keys (with defaults) to a Detectron2 config, in place.

    Args:
        cfg (CfgNode): a config from ``detectron2.config.get_cfg()``.

    Returns:
        CfgNode: the same ``cfg``, for chaining.
    """
    if "LIBRAGHM" in cfg:
        return cfg
    _C = cfg
    _C.LIBRAGHM = CN()

    # ---------------------------------------------------------------------------------------------
    # Data: the built-in "shapes" dataset and users' own COCO-format datasets
    # ---------------------------------------------------------------------------------------------
    # Extra COCO-format datasets to register before training, as [name, json_file, image_root]
    # triples, e.g. [["my_train", "/data/ann/train.json", "/data/train2017"]]. Paths are checked
    # (and a clear error raised) before the model is trained.
    _C.LIBRAGHM.COCO_DATASETS = []

    # A narrow ResNet bottom-up (see libraghm/backbone/small_resnet.py) for CPU-sized configs.
    # Stage widths of res2..res5; only used by the "build_small_resnet_*" backbone builders.
    _C.LIBRAGHM.SMALL_RESNET = CN()
    _C.LIBRAGHM.SMALL_RESNET.WIDTHS = [16, 32, 64, 128]
    _C.LIBRAGHM.SMALL_RESNET.BLOCKS = [1, 1, 1, 1]

    # Clip the norm of all gradients together to this value before each optimizer step
    # (mmdetection's GHM / Libra recipes use 35); 0 = off. See libraghm/solver.py.
    _C.LIBRAGHM.CLIP_GRAD_NORM = 0.0

    # Log LibraGHM's training statistics (sampled-negative IoU histogram, GHM gradient-norm
    # histogram and weights, BiFPN fusion weights) to the EventStorage every this many
    # iterations; 0 = off. See libraghm/events.py.
    _C.LIBRAGHM.LOG_PERIOD = 20

    # ---------------------------------------------------------------------------------------------
    # Samplers (IoU-balanced, instance-balanced, random) for the ROI heads and the RPN
    # ---------------------------------------------------------------------------------------------
    # <sampling-config>
    # Which candidates train the heads. ROI_SAMPLER is used by MODEL.ROI_HEADS.NAME:
    # "LibraROIHeads" (proposals), RPN_SAMPLER by MODEL.PROPOSAL_GENERATOR.NAME: "LibraRPN"
    # (anchors); see libraghm/sampling/. How many are sampled stays Detectron2's:
    # MODEL.ROI_HEADS / MODEL.RPN .BATCH_SIZE_PER_IMAGE and .POSITIVE_FRACTION.
    for _key in ("ROI_SAMPLER", "RPN_SAMPLER"):
        _C.LIBRAGHM[_key] = CN()
        # A name in libraghm.sampling.SAMPLER_REGISTRY: "RandomSampler" (Detectron2's own
        # subsample_labels, exactly), "IoUBalancedSampler" (Libra R-CNN: IoU-balanced negatives,
        # instance-balanced positives), "InstanceBalancedSampler" (instance-balanced positives,
        # random negatives).
        _C.LIBRAGHM[_key].NAME = "RandomSampler"
        # IoUBalancedSampler: number K of equal IoU bins over the negatives' own IoU range (>= 1).
        _C.LIBRAGHM[_key].NUM_BINS = 3
        # IoUBalancedSampler: negatives with IoU below this form a "floor" group sampled at
        # random with FLOOR_FRACTION of the negative quota (< 1; negative = no floor group).
        _C.LIBRAGHM[_key].FLOOR_THRESH = -1.0
        _C.LIBRAGHM[_key].FLOOR_FRACTION = 0.0  # in [0, 1]
        # IoUBalancedSampler: "instance_balanced" (equal quota per ground truth) or "random".
        _C.LIBRAGHM[_key].POSITIVES = "instance_balanced"
        # IoUBalancedSampler: reproduce mmdetection 3.x IoUBalancedNegSampler (bins over
        # [floor, max IoU of ALL candidates]; FLOOR_THRESH -1 rewritten to 0 after the first call).
        _C.LIBRAGHM[_key].MMDET_COMPAT = False
    # </sampling-config>

    # ---------------------------------------------------------------------------------------------
    # OHEM in the ROI heads' subsampling step
    # ---------------------------------------------------------------------------------------------
    # <ohem-config>
    # Used by MODEL.ROI_HEADS.NAME: "OHEMROIHeads" (libraghm/modeling/ohem_roi_heads.py); B is
    # MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE (RoIs trained on per image).
    _C.LIBRAGHM.OHEM = CN()
    # "paper": rank all candidate RoIs by classification + box-regression loss, NMS over the
    #   loss-ranked RoIs, keep the top B per image regardless of label (Shrivastava et al. 2016).
    # "mmdet": mmdetection's OHEMSampler: rank by classification loss only, no NMS, keep the
    #   MODEL.ROI_HEADS.POSITIVE_FRACTION quota (hardest positives, hardest negatives for the rest).
    _C.LIBRAGHM.OHEM.MODE = "paper"
    # "paper" mode: IoU in [0, 1] above which a lower-loss RoI is suppressed by a higher-loss one
    # of the same image. 1.0 turns the NMS off (no IoU exceeds 1). Not used in "mmdet" mode.
    _C.LIBRAGHM.OHEM.NMS_THRESH = 0.7
    # </ohem-config>

    # ---------------------------------------------------------------------------------------------
    # Balanced L1 box-regression loss
    # ---------------------------------------------------------------------------------------------
    # <balanced-l1-config>
    # Used by any head whose BBOX_REG_LOSS_TYPE is "balanced_l1" (MODEL.ROI_BOX_HEAD / MODEL.RPN /
    # MODEL.RETINANET; see libraghm/losses/box_regression.py). Shared by all such heads; the
    # heads' own SMOOTH_L1_BETA keys are not read by this type. Validated at model build time.
    _C.LIBRAGHM.BALANCED_L1 = CN()
    # Inlier gradient scale alpha (> 0); gradient below BETA is alpha * ln(b*x/BETA + 1).
    _C.LIBRAGHM.BALANCED_L1.ALPHA = 0.5
    # Outlier gradient gamma (> 0), the slope above BETA; b = exp(GAMMA / ALPHA) - 1.
    _C.LIBRAGHM.BALANCED_L1.GAMMA = 1.5
    # Where the loss turns linear (> 0). Paper: 1.0 (Faster R-CNN), 0.11 (Libra RetinaNet).
    _C.LIBRAGHM.BALANCED_L1.BETA = 1.0
    # False: BETA scales the whole function, BETA * L(x / BETA) (paper-correct: gradient 0 at 0,
    # continuous at BETA). True: mmdetection's form, BETA only inside the logarithm (at BETA=0.11
    # gradient 4.04 at 0 and a jump 1.70 -> 1.50 at BETA; Libra RetinaNet's published numbers).
    _C.LIBRAGHM.BALANCED_L1.MMDET_COMPAT = False
    # </balanced-l1-config>

    # ---------------------------------------------------------------------------------------------
    # GHM-C and GHM-R losses
    # ---------------------------------------------------------------------------------------------
    # <ghm-config>
    # GHM-C (libraghm/losses/ghm_loss.py): classification loss of GHMRetinaNet and objectness loss
    # of GHMRPN. Paper defaults: 30 bins, momentum 0.75, loss weight 1.
    # GHM-R (libraghm/losses/ghm_loss.py): box loss of GHMRetinaNet. Paper defaults: mu 0.02,
    # 10 bins, momentum 0.7, loss weight 10. Both have the keys below; GHMR also has MU.
    for _key, _bins, _momentum, _loss_weight in (("GHMC", 30, 0.75, 1.0), ("GHMR", 10, 0.7, 10.0)):
        _C.LIBRAGHM[_key] = CN()
        _C.LIBRAGHM[_key].BINS = _bins  # number of equal gradient-norm bins on [0, 1], >= 1
        # Moving average of the bin counts, in [0, 1); 0 = off.
        _C.LIBRAGHM[_key].MOMENTUM = _momentum
        _C.LIBRAGHM[_key].LOSS_WEIGHT = _loss_weight
        # Adam-style bias correction of the moving average (divide by 1 - MOMENTUM^t).
        _C.LIBRAGHM[_key].BIAS_CORRECTION = True
        # False: one histogram over the whole batch (all images, all levels), one update per step.
        # True: mmdetection's behaviour, one histogram + moving-average update per pyramid level,
        # each level normalised on its own, level losses summed.
        _C.LIBRAGHM[_key].PER_LEVEL = False
        # mmdetection's weight details: weights divided by the number of non-empty bins, label
        # weights only as a 0/1 mask, moving average from 0 without bias correction
        # (BIAS_CORRECTION ignored), only non-empty bins updated.
        _C.LIBRAGHM[_key].MMDET_COMPAT = False
        # Sum the bin counts across processes before use (identical weights on every process).
        _C.LIBRAGHM[_key].SYNC_COUNTS = True
        # NaN/Inf predictions: "skip" (drop them like ignored samples, no host sync) or "error"
        # (raise FloatingPointError; costs one host sync per step).
        _C.LIBRAGHM[_key].NONFINITE = "skip"
    _C.LIBRAGHM.GHMR.MU = 0.02  # authentic smooth L1 sqrt(d^2 + MU^2) - MU, > 0
    # Loss choice of META_ARCHITECTURE "GHMRetinaNet".
    _C.LIBRAGHM.GHM_RETINANET = CN()
    # "ghm_c" or "focal" (Detectron2's sigmoid focal loss, MODEL.RETINANET.FOCAL_LOSS_*).
    _C.LIBRAGHM.GHM_RETINANET.CLS_LOSS_TYPE = "ghm_c"
    # "ghm_r" or "detectron2" (MODEL.RETINANET.BBOX_REG_LOSS_TYPE, e.g. smooth_l1, giou).
    _C.LIBRAGHM.GHM_RETINANET.BOX_LOSS_TYPE = "ghm_r"
    # PROPOSAL_GENERATOR.NAME "GHMRPN": keep Detectron2's random subsampling of anchors
    # (MODEL.RPN.BATCH_SIZE_PER_IMAGE) before GHM-C, or (False) apply GHM-C to all valid anchors.
    _C.LIBRAGHM.GHM_RPN = CN()
    _C.LIBRAGHM.GHM_RPN.SUBSAMPLE = False
    # </ghm-config>

    # ---------------------------------------------------------------------------------------------
    # Balanced Feature Pyramid
    # ---------------------------------------------------------------------------------------------
    # <bfp-config>
    # Used by the backbone builder "build_bfp_backbone" (MODEL.BACKBONE.NAME), which builds the FPN
    # named here and wraps it in a BalancedFeaturePyramid (libraghm/backbone/bfp.py).
    _C.LIBRAGHM.BFP = CN()
    # BACKBONE_REGISTRY builder of the wrapped FPN: "build_resnet_fpn_backbone" (P2-P6, Faster
    # R-CNN), "build_retinanet_resnet_fpn_backbone" (P3-P7, RetinaNet),
    # "build_small_resnet_fpn_backbone", "build_small_resnet_retinanet_fpn_backbone", ...
    _C.LIBRAGHM.BFP.FPN_BUILDER = "build_resnet_fpn_backbone"
    # Refinement of the balanced feature: "non_local" (paper: embedded Gaussian, zero-init output,
    # no 1/sqrt(d) scaling), "conv" (3x3 conv + ReLU), "none".
    _C.LIBRAGHM.BFP.REFINE = "non_local"
    # Index (levels sorted by stride) of the reference level every level is rescaled to;
    # -1 = the level at stride 16 (paper: P4 = index 2 of P2-P6, index 1 of P3-P7).
    _C.LIBRAGHM.BFP.REFINE_LEVEL = -1
    # "strided": strided max pool / integer nearest repeat, cropped to exact sizes (deterministic
    # backward), adaptive max pool only where sizes do not fit; "adaptive": mmdetection's
    # adaptive_max_pool2d / size-based nearest everywhere (same results when sizes divide exactly).
    _C.LIBRAGHM.BFP.RESIZE_MODE = "strided"
    # </bfp-config>

    # ---------------------------------------------------------------------------------------------
    # BiFPN
    # ---------------------------------------------------------------------------------------------
    # <bifpn-config>
    # BiFPN (EfficientDet) over any Detectron2 bottom-up: MODEL.BACKBONE.NAME "build_bifpn_backbone".
    # See libraghm/backbone/bifpn.py. Defaults are EfficientDet's (D0 width / repeats, P3-P7).
    _C.LIBRAGHM.BIFPN = CN()
    # BACKBONE_REGISTRY name of the bottom-up builder (called with the whole cfg).
    _C.LIBRAGHM.BIFPN.BOTTOM_UP = "build_resnet_backbone"
    # Bottom-up features for the lowest levels, finest first, strides doubling (res3..res5 = P3..P5).
    # They must be among the bottom-up's outputs (for a ResNet: MODEL.RESNETS.OUT_FEATURES).
    _C.LIBRAGHM.BIFPN.IN_FEATURES = ["res3", "res4", "res5"]
    # Coarsest level: 7 for RetinaNet (P3-P7), 6 for Faster R-CNN (P2-P6). Levels above the last
    # IN_FEATURE are made from it: P6 = maxpool(norm(conv1x1(C5))), P7 = maxpool(P6).
    _C.LIBRAGHM.BIFPN.TOP_LEVEL = 7
    # "" (use WIDTH / REPEATS) or "D0".."D7": EfficientDet's (width, repeats), overriding both.
    _C.LIBRAGHM.BIFPN.PRESET = ""
    _C.LIBRAGHM.BIFPN.WIDTH = 64
    _C.LIBRAGHM.BIFPN.REPEATS = 3
    # Node fusion: "fast" (fast normalised, paper default), "softmax" or "sum".
    _C.LIBRAGHM.BIFPN.FUSION = "fast"
    _C.LIBRAGHM.BIFPN.FUSION_EPS = 1e-4
    # True: depthwise-separable 3x3 conv in each node (paper); False: a regular 3x3 conv.
    _C.LIBRAGHM.BIFPN.SEPARABLE_CONV = True
    # Norm after each node's conv and each 1x1 lateral conv: "BN", "SyncBN", "GN" or "" (none).
    _C.LIBRAGHM.BIFPN.NORM = "BN"
    # EfficientDet's BN: TF momentum 0.99 = PyTorch momentum 0.01, eps 1e-3.
    _C.LIBRAGHM.BIFPN.BN_MOMENTUM = 0.01
    _C.LIBRAGHM.BIFPN.BN_EPS = 1e-3
    _C.LIBRAGHM.BIFPN.GN_NUM_GROUPS = 32
    # Activation applied to each node's fused input, before its conv: "silu" (swish), "relu", "".
    _C.LIBRAGHM.BIFPN.ACTIVATION = "silu"
    # Input padding; 0 = the top level's stride (2**TOP_LEVEL, e.g. 128 for P7). Any multiple of
    # the bottom-up's own stride works, since every edge resamples to the target's exact size.
    _C.LIBRAGHM.BIFPN.SIZE_DIVISIBILITY = 0
    # </bifpn-config>

    return cfg
