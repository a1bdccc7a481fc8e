#!/usr/bin/env python
"""
Train and evaluate LibraGHM models with Detectron2's standard engine.

    python train_net.py --config-file configs/Shapes-Detection/faster_rcnn_small_R_FPN.yaml
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CFG --resume            # continue from OUTPUT_DIR/last_checkpoint
    python train_net.py --config-file CFG --num-gpus 8        # multi-process via detectron2's launch

Users' own COCO-format data:
    python train_net.py --config-file CFG \
        LIBRAGHM.COCO_DATASETS "[['my_train','ann/train.json','images/train'],['my_val','ann/val.json','images/val']]" \
        DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)" MODEL.ROI_HEADS.NUM_CLASSES 3
"""
import contextlib
import functools
import logging
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "projects", "LibraGHM"))

import detectron2.engine.defaults as d2_defaults  # noqa: E402
import detectron2.utils.comm as comm  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetMapper, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import COCOEvaluator, verify_results  # noqa: E402

from libraghm import add_libraghm_config, check_config, maybe_add_full_model_gradient_clipping  # noqa: E402
from libraghm.data import prepare_datasets  # noqa: E402
from libraghm.data.augmentation import build_train_augmentations  # noqa: E402
from libraghm.data.resumable_loader import build_resumable_train_loader  # noqa: E402
from libraghm.engine import PERIOD, DivergenceGuard, FiniteCheckpointer, IterationSeed  # noqa: E402
from libraghm.modeling import apply_efficientdet_preset  # noqa: E402


@contextlib.contextmanager
def cpu_ddp(cfg):
    """
    Make ``DefaultTrainer.__init__`` wrap a CPU model for multi-process (gloo) training.

    Detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which
    DistributedDataParallel rejects for a CPU model, and ``DefaultTrainer.__init__`` calls it with no
    hook to change that. Only while the trainer is being constructed, and only for a CPU model in a
    multi-process run, the name ``create_ddp_model`` in ``detectron2.engine.defaults`` refers to the
    same function with ``device_ids=None``; it is restored when the block exits (also on error).
    Nothing else, and no other time, is affected.

    Args:
        cfg (CfgNode): the training config.
    """
    if comm.get_world_size() == 1 or not cfg.MODEL.DEVICE.startswith("cpu"):
        yield
        return
    original = d2_defaults.create_ddp_model
    with mock.patch.object(
        d2_defaults, "create_ddp_model", functools.partial(original, device_ids=None)
    ):
        yield


class Trainer(DefaultTrainer):
    """
    DefaultTrainer with COCOEvaluator for every test set, CPU multi-process support, a divergence
    guard, and (LIBRAGHM.EXACT_RESUME) a data stream and step randomness that resume exactly.
    """

    def __init__(self, cfg):
        # one seed for the data stream and the steps; random (shared by all processes) if SEED < 0
        self.seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        with cpu_ddp(cfg):
            super().__init__(cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        """
        Detectron2's loader, or with LIBRAGHM.EXACT_RESUME the resumable one of the same data; with
        INPUT.SCALE_JITTER.ENABLED, Detectron2's DatasetMapper with the scale-jitter augmentations.
        """
        augmentations = build_train_augmentations(cfg)
        mapper = None if augmentations is None else DatasetMapper(cfg, True, augmentations=augmentations)
        if cfg.LIBRAGHM.EXACT_RESUME:
            return build_resumable_train_loader(cfg, mapper)
        if mapper is None:
            return super().build_train_loader(cfg)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    def build_hooks(self):
        """
        DefaultTrainer's hooks, with every checkpoint write refused for a non-finite model and a
        DivergenceGuard (LIBRAGHM.FINITE_CHECK_PERIOD) running before the checkpointer.
        """
        self.checkpointer = FiniteCheckpointer(
            self.checkpointer.model, self.checkpointer.save_dir, **self.checkpointer.checkpointables
        )
        period = PERIOD.check(self.cfg.LIBRAGHM.FINITE_CHECK_PERIOD, "LIBRAGHM.FINITE_CHECK_PERIOD")
        hooks = [DivergenceGuard(self.model, period)] + super().build_hooks()
        if self.cfg.LIBRAGHM.EXACT_RESUME:
            hooks.insert(0, IterationSeed(self.seed, self._trainer.data_loader.batch_sampler))
        return hooks

    @classmethod
    def build_optimizer(cls, cfg, model):
        """DefaultTrainer.build_optimizer, plus LIBRAGHM.CLIP_GRAD_NORM (whole-model clipping)."""
        return maybe_add_full_model_gradient_clipping(cfg, super().build_optimizer(cfg, model))


def setup(args):
    """Build the config from defaults, LibraGHM's keys, the yaml file and command-line overrides,
    then apply the EfficientDet preset (if any)."""
    cfg = get_cfg()
    add_libraghm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    apply_efficientdet_preset(cfg)  # MODEL.EFFICIENTDET.PRESET: after the file and the command line
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("libraghm").warning("CUDA is not available: training on the CPU.")
        cfg.MODEL.DEVICE = "cpu"
    check_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    prepare_datasets(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main():
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
