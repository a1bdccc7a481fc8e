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

    # ---------------------------------------------------------------------------------------------
    # Sampling (issue: samplers / OHEM). Keys: LIBRAGHM.ROI_SAMPLER, LIBRAGHM.RPN_SAMPLER, ...
    # ---------------------------------------------------------------------------------------------
    # <sampling-config>
    # </sampling-config>

    # ---------------------------------------------------------------------------------------------
    # Losses (issue: Balanced L1, GHM-C, GHM-R). Keys: LIBRAGHM.BALANCED_L1, LIBRAGHM.GHMC, ...
    # ---------------------------------------------------------------------------------------------
    # <losses-config>
    # </losses-config>

    # ---------------------------------------------------------------------------------------------
    # Feature pyramids (issue: BFP, BiFPN). Keys: LIBRAGHM.BFP, LIBRAGHM.BIFPN
    # ---------------------------------------------------------------------------------------------
    # <pyramids-config>
    # </pyramids-config>
    return cfg
