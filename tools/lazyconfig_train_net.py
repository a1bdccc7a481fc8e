#!/usr/bin/env python
"""
Train and evaluate LibraGHM models described by LazyConfig (Python) files, such as those under
configs/Shapes-Detection/lazy/. A config file defines ``model``, ``dataloader`` (``train``,
``test``, ``evaluator``), ``optimizer``, ``lr_multiplier`` and ``train`` (what ``train`` holds:
configs/Shapes-Detection/lazy/common.py).

    CFG=configs/Shapes-Detection/lazy/libra_faster_rcnn.py
    python tools/lazyconfig_train_net.py --config-file $CFG
    # overrides: dotted.key=value
    python tools/lazyconfig_train_net.py --config-file $CFG train.max_iter=600 optimizer.optimizer.lr=0.01
    # evaluate a checkpoint
    python tools/lazyconfig_train_net.py --config-file $CFG --eval-only train.init_checkpoint=PATH.pth
    # continue from train.output_dir/last_checkpoint
    python tools/lazyconfig_train_net.py --config-file $CFG --resume
    # several processes (one per GPU, or gloo on the CPU), via detectron2's launch
    python tools/lazyconfig_train_net.py --config-file $CFG --num-gpus 2

Without CUDA everything runs on the CPU.
"""
import logging
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "LibraGHM"))

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.engine import (  # noqa: E402
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model  # noqa: E402
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.utils import comm  # noqa: E402

import libraghm  # noqa: E402,F401  registers LibraGHM's parts and the built-in datasets
from libraghm.data import ensure_shapes  # noqa: E402
from libraghm.data.resumable_loader import ResumableBatchSampler  # noqa: E402
from libraghm.engine import PERIOD, DivergenceGuard, FiniteCheckpointer, IterationSeed  # noqa: E402

logger = logging.getLogger("libraghm.lazyconfig_train_net")


def _dataset_names(cfg):
    """The dataset names the train and test loaders read (``dataloader.*.dataset.names``)."""
    names = []
    for split in ("train", "test"):
        node = cfg.dataloader.get(split)
        dataset = node.get("dataset") if node is not None else None
        value = dataset.get("names") if hasattr(dataset, "get") else None
        if value is None:
            continue
        names.extend([value] if isinstance(value, str) else list(value))
    return names


def prepare_datasets(cfg):
    """
    Check that every dataset the loaders name is registered and generate the built-in splits they
    use, so that a wrong name fails before the model is built.
    """
    registered = set(DatasetCatalog.list())
    for name in _dataset_names(cfg):
        if name not in registered:
            raise KeyError(
                f"dataloader names dataset {name!r}, which is not registered; register it first "
                "(libraghm.data.register_coco_dataset) or use a built-in one: "
                f"{sorted(n for n in registered if n.startswith('shapes_'))}."
            )
        split = getattr(MetadataCatalog.get(name), "libraghm_shapes_split", None)
        if split is not None:
            ensure_shapes(split)


def _optimizer_params(optimizer_cfg):
    """The node of the optimizer config that receives the model (``params``), also when the
    optimizer is wrapped (``optimizer.optimizer.params``, as with gradient clipping)."""
    node = optimizer_cfg
    while "params" not in node:
        if "optimizer" not in node:
            raise KeyError("the optimizer config has no 'params' (nor a wrapped 'optimizer').")
        node = node.optimizer
    return node.params


def build_model(cfg):
    """The model of ``cfg.model`` on ``cfg.train.device``."""
    model = instantiate(cfg.model)
    return model.to(cfg.train.device)


def wrap_ddp(cfg, model):
    """DistributedDataParallel in a multi-process run (a CPU model takes no device_ids)."""
    kwargs = dict(cfg.train.get("ddp", {}))
    if str(cfg.train.device).startswith("cpu"):
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def evaluate(cfg, model):
    """
    Run ``cfg.dataloader.evaluator`` (COCOEvaluator in the shapes configs) on ``dataloader.test``.

    Returns:
        dict: e.g. {"bbox": {"AP": ..., "AP50": ..., ...}}; empty when the config has no evaluator.
    """
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def train(cfg, resume=False):
    """
    Train ``cfg.model`` for ``cfg.train.max_iter`` iterations (or continue the last checkpoint in
    ``cfg.train.output_dir`` with ``resume``), saving checkpoints every
    ``train.checkpointer.period`` iterations and at the end, and evaluating every
    ``train.eval_period`` iterations and at the end. As train_net.py does, training stops if a
    parameter or buffer turns NaN/Inf (checked every ``train.finite_check_period`` iterations and
    after the last one), and no checkpoint of such a model is written; with LibraGHM's resumable
    loader (``build_resumable_loader``) a resumed run repeats a straight one exactly.

    Returns:
        the trainer, after training.
    """
    model = build_model(cfg)
    logger.info("Model:\n%s", model)
    _optimizer_params(cfg.optimizer).model = model
    optimizer = instantiate(cfg.optimizer)
    data_loader = instantiate(cfg.dataloader.train)
    model = wrap_ddp(cfg, model)

    trainer_class = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
    trainer = trainer_class(model, data_loader, optimizer)
    checkpointer = FiniteCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    period = PERIOD.check(cfg.train.get("finite_check_period", 20), "train.finite_check_period")
    main = comm.is_main_process()
    # with an exactly resumable loader, every step's randomness follows from its seed too
    stream = getattr(data_loader, "batch_sampler", None)
    exact = isinstance(stream, ResumableBatchSampler)
    trainer.register_hooks(
        [
            IterationSeed(stream.seed, stream) if exact else None,
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            DivergenceGuard(model, period),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: evaluate(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def setup(args):
    """
    Load ``args.config_file``, apply ``args.opts`` (key=value), set up logging, the output folder
    and the seed (``train.seed``), and prepare the datasets.
    """
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU.")
        cfg.train.device = "cpu"
    default_setup(cfg, args)
    prepare_datasets(cfg)
    return cfg


def main(args):
    """
    Returns:
        with ``--eval-only``: the evaluation results (dict); else the trainer after training.
    """
    cfg = setup(args)
    if args.eval_only:
        model = wrap_ddp(cfg, build_model(cfg))
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        return evaluate(cfg, model)
    return train(cfg, resume=args.resume)


def invoke_main():
    args = default_argument_parser().parse_args()
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
