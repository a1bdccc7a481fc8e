"""The LazyConfig headline models (configs/Shapes-Detection/lazy) and tools/lazyconfig_train_net.py.

Oracle: the yaml configs they translate. The lazy models must equal the yaml models built by
``build_model`` part for part (parameters, buffers, initial weights for a seed, every setting of
every part, the training losses on a fixed batch); data, optimiser and schedule settings must be
the yaml ones; and the training script must train, checkpoint, resume and evaluate.
"""
import enum
import functools
import importlib.util
import json
import math
import numbers
import os
import re

import pytest
import torch
from omegaconf import DictConfig, ListConfig

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.utils.events import EventStorage

from conftest import REPO, get_config, tiny_batch
from libraghm.backbone import BalancedFeaturePyramid
from libraghm.engine import DivergenceGuard
from libraghm.losses import GHMC, GHMR, BalancedL1Loss
from libraghm.modeling import LibraGHMFastRCNNOutputLayers, LibraGHMRetinaNet, LibraGHMROIHeads
from libraghm.sampling import IoUBalancedSampler

LAZY = os.path.join(REPO, "configs", "Shapes-Detection", "lazy")
SCRIPT = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
# lazy config -> the yaml config it translates (relative to configs/)
PAIRS = {
    "libra_faster_rcnn": "Shapes-Detection/libra_faster_rcnn.yaml",
    "ghm_retinanet": "Shapes-Detection/ghm_retinanet.yaml",
}


@functools.lru_cache(maxsize=None)
def _script():
    """tools/lazyconfig_train_net.py as a module."""
    spec = importlib.util.spec_from_file_location("lazyconfig_train_net", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(name):
    return LazyConfig.load(os.path.join(LAZY, name + ".py"))


def describe(obj, path="", out=None, seen=None):
    """
    Every setting of a model as {attribute path: value}: module and plain-object attributes
    (matchers, box transforms, samplers, losses...) recursively, parameters and buffers as
    (shape, dtype). Sequences of any kind (list, tuple, ListConfig) compare as sequences.
    """
    if out is None:
        out, seen = {}, set()
    if isinstance(obj, (list, tuple, ListConfig)):
        out[path] = f"sequence of {len(obj)}"
        for i, x in enumerate(obj):
            describe(x, f"{path}[{i}]", out, seen)
    elif isinstance(obj, (dict, DictConfig)):
        out[path] = f"mapping of {sorted(map(str, obj))}"
        for k in obj:
            describe(obj[k], f"{path}[{k!r}]", out, seen)
    elif obj is None or isinstance(obj, (bool, numbers.Number, str, enum.Enum)):
        out[path] = obj
    elif isinstance(obj, torch.Tensor):
        out[path] = ("tensor", tuple(obj.shape), obj.dtype)
    elif isinstance(obj, (torch.device, torch.dtype)):
        out[path] = str(obj)
    elif id(obj) in seen:
        out[path] = "seen " + type(obj).__qualname__
    else:
        seen.add(id(obj))
        out[path + ".__class__"] = f"{type(obj).__module__}.{type(obj).__qualname__}"
        attrs = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
        if isinstance(obj, torch.nn.Module):
            for key in ("_parameters", "_buffers", "_modules"):
                attrs.update(attrs.pop(key))
            attrs = {k: v for k, v in attrs.items() if k[0] != "_" or k.startswith("_out_")}
            attrs.pop("training", None)
        for k, v in attrs.items():
            if not callable(v) or isinstance(v, torch.nn.Module) or hasattr(v, "__dict__"):
                describe(v, f"{path}.{k}", out, seen)
    return out


def differences(a, b):
    """{attribute path: (value in a, value in b)} wherever :func:`describe` of a and b differ."""
    da, db = describe(a), describe(b)
    pairs = {k: (da.get(k, "<none>"), db.get(k, "<none>")) for k in set(da) | set(db)}
    return {k: v for k, v in pairs.items() if v[0] != v[1]}


def _yaml_model(yaml, seed):
    torch.manual_seed(seed)
    return build_model(get_config(yaml))


def _lazy_model(cfg, seed):
    torch.manual_seed(seed)
    return instantiate(cfg.model)


def _train_losses(model, batch):
    model.train()
    torch.manual_seed(0)
    with EventStorage(0):
        return {k: float(v) for k, v in model(batch).items()}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_lazy_model_equals_yaml_model(name):
    cfg = _load(name)
    yaml_model, lazy_model = _yaml_model(PAIRS[name], 3), _lazy_model(cfg, 3)
    # the LibraGHM parts are there, as objects
    if name == "libra_faster_rcnn":
        assert isinstance(lazy_model.backbone, BalancedFeaturePyramid)
        assert isinstance(lazy_model.roi_heads, LibraGHMROIHeads)
        assert isinstance(lazy_model.roi_heads.sampler, IoUBalancedSampler)
        assert isinstance(lazy_model.roi_heads.box_predictor, LibraGHMFastRCNNOutputLayers)
        assert isinstance(lazy_model.roi_heads.box_predictor.box_regression_loss, BalancedL1Loss)
    else:
        assert isinstance(lazy_model, LibraGHMRetinaNet)
        assert isinstance(lazy_model.cls_loss, GHMC) and isinstance(lazy_model.box_reg_loss, GHMR)
    # same parameters and buffers, in the same order, with the same initial values for a seed
    ys, ls = yaml_model.state_dict(), lazy_model.state_dict()
    assert list(ys) == list(ls)
    for k in ys:
        assert ys[k].shape == ls[k].shape and ys[k].dtype == ls[k].dtype, k
        assert torch.equal(ys[k], ls[k]), k
    # ... and not by accident: another seed gives other weights
    other = _lazy_model(cfg, 4).state_dict()
    assert not all(torch.equal(ls[k], other[k]) for k in ls)
    # every setting of every part is the yaml one
    assert differences(yaml_model, lazy_model) == {}
    # and so the training losses on a fixed batch (sampling, GHM statistics included)
    batch = tiny_batch(2, seed=5)
    assert _train_losses(yaml_model, batch) == _train_losses(lazy_model, batch)


def test_model_comparison_sees_a_changed_setting():
    """The comparison above is not vacuous: one changed setting deep in the model is reported."""
    cfg = _load("libra_faster_rcnn")
    base = _lazy_model(cfg, 0)
    cfg.model.roi_heads.sampler.num_bins = 4
    cfg.model.proposal_generator.anchor_matcher.thresholds = [0.3, 0.6]
    diff = differences(base, _lazy_model(cfg, 0))
    # (the matcher keeps its thresholds as [-inf, 0.3, 0.7, inf])
    assert set(diff) == {
        ".roi_heads.sampler.num_bins", ".proposal_generator.anchor_matcher.thresholds[2]"
    }
    assert diff[".roi_heads.sampler.num_bins"] == (3, 4)


def _augmentations(mapper):
    """A mapper's augmentations as (class, settings), sequences as lists."""
    return [
        (type(aug).__name__, {k: list(v) if isinstance(v, (tuple, list, ListConfig)) else v
                              for k, v in vars(aug).items()})
        for aug in mapper.augmentations.augs
    ]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_training_settings_equal_yaml(name):
    cfg, yaml_cfg = _load(name), get_config(PAIRS[name], tiny=False)
    solver = yaml_cfg.SOLVER
    # optimiser: SGD hyper-parameters and the whole-model clipping
    sgd = cfg.optimizer.optimizer
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (
        solver.BASE_LR, solver.MOMENTUM, solver.WEIGHT_DECAY)
    assert sgd.params.weight_decay_norm == solver.WEIGHT_DECAY_NORM
    assert cfg.optimizer.max_norm == yaml_cfg.LIBRAGHM.CLIP_GRAD_NORM
    model = torch.nn.Linear(2, 2)
    cfg.optimizer.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert isinstance(optimizer, torch.optim.SGD)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)  # global norm 100 * sqrt(6)
    optimizer.step()
    norm = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    assert norm == pytest.approx(yaml_cfg.LIBRAGHM.CLIP_GRAD_NORM or 100.0 * 6 ** 0.5, rel=1e-5)
    # the LR factor at every iteration of the schedule
    assert cfg.train.max_iter == solver.MAX_ITER
    yaml_sched = build_lr_scheduler(yaml_cfg, torch.optim.SGD(model.parameters(), lr=1.0))
    lazy_sched = instantiate(cfg.lr_multiplier)
    for it in range(solver.MAX_ITER):
        expected = yaml_sched.get_last_lr()[0]
        assert lazy_sched(it / solver.MAX_ITER) == pytest.approx(expected, rel=1e-9), it
        yaml_sched.optimizer.step()
        yaml_sched.step()
    # data: datasets, batch, workers, the mappers' augmentations and options
    train, test = cfg.dataloader.train, cfg.dataloader.test
    assert (train.dataset.names,) == yaml_cfg.DATASETS.TRAIN
    assert (test.dataset.names,) == yaml_cfg.DATASETS.TEST
    assert train.total_batch_size == solver.IMS_PER_BATCH
    assert train.num_workers == test.num_workers == yaml_cfg.DATALOADER.NUM_WORKERS
    for node, is_train in ((train.mapper, True), (test.mapper, False)):
        lazy_mapper, yaml_mapper = instantiate(node), DatasetMapper(yaml_cfg, is_train)
        assert _augmentations(lazy_mapper) == _augmentations(yaml_mapper)
        assert {k: v for k, v in vars(lazy_mapper).items() if k != "augmentations"} == {
            k: v for k, v in vars(yaml_mapper).items() if k != "augmentations"}
    assert cfg.train.checkpointer.period == solver.CHECKPOINT_PERIOD
    assert cfg.train.eval_period == yaml_cfg.TEST.EVAL_PERIOD
    assert cfg.train.finite_check_period == yaml_cfg.LIBRAGHM.FINITE_CHECK_PERIOD
    assert cfg.train.log_period == 20


def tiny_lazy_opts(output_dir, max_iter, *extra):
    """Overrides for a short lazyconfig_train_net.py run on the mini splits (as tiny_train_opts)."""
    return [
        f"train.output_dir={output_dir}", "train.device=cpu", f"train.max_iter={max_iter}",
        "train.seed=7", "train.log_period=1", "train.checkpointer.period=1000",
        "dataloader.train.dataset.names=shapes_train_mini",
        "dataloader.test.dataset.names=shapes_val_mini",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
        "dataloader.train.mapper.augmentations.0.max_size=192",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        "dataloader.test.mapper.augmentations.0.max_size=192",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.total_batch_size=2",
    ] + list(extra)


def _args(name, opts, *flags):
    return default_argument_parser().parse_args(
        ["--config-file", os.path.join(LAZY, name + ".py"), *flags, *opts]
    )


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_train_checkpoint_eval_only(tmp_path):
    """Libra Faster R-CNN: a short training run, its checkpoint read back, --eval-only on it."""
    script = _script()
    out = tmp_path / "libra"
    opts = tiny_lazy_opts(out, 3)
    cfg = _load("libra_faster_rcnn")
    initial = _lazy_model(cfg, 7).state_dict()  # train.seed=7: the run starts from these weights
    trainer = script.main(_args("libra_faster_rcnn", opts))
    metrics = _metrics(out)
    losses = [m for m in metrics if "total_loss" in m]
    assert [m["iteration"] for m in losses] == [0, 1, 2]
    keys = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "total_loss"}
    assert all(keys <= set(m) and all(math.isfinite(m[k]) for k in keys) for m in losses)
    evals = [m for m in metrics if "bbox/AP" in m]
    assert len(evals) == 1 and os.path.isfile(out / "inference" / "coco_instances_results.json")
    # the final checkpoint reads back into a fresh model, equal to the trained one (which trained)
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(str(out / "model_final.pth"))
    trained = trainer.model.state_dict()
    loaded = model.state_dict()
    assert list(loaded) == list(trained)
    assert all(torch.equal(loaded[k], trained[k]) for k in loaded)
    assert not all(torch.equal(loaded[k], initial[k]) for k in loaded)
    # --eval-only evaluates the checkpoint: the detections and COCO AP of the run's last evaluation
    checkpoint = f"train.init_checkpoint={out / 'model_final.pth'}"
    results = script.main(
        _args("libra_faster_rcnn", tiny_lazy_opts(tmp_path / "eval", 0, checkpoint), "--eval-only")
    )
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(results["bbox"])
    assert 0.0 <= results["bbox"]["AP"] <= 100.0
    assert results["bbox"]["AP"] == pytest.approx(evals[0]["bbox/AP"], abs=1e-9)
    with open(out / "inference" / "coco_instances_results.json") as f:
        detections = json.load(f)
    with open(tmp_path / "eval" / "inference" / "coco_instances_results.json") as f:
        assert json.load(f) == detections and len(detections) > 0


def test_ghm_retinanet_trains_with_clipping_and_resumes(tmp_path):
    """GHM RetinaNet: clipped optimiser, finite losses, GHM statistics saved, --resume."""
    script = _script()
    out = tmp_path / "ghm"
    trainer = script.main(_args("ghm_retinanet", tiny_lazy_opts(out, 2)))
    assert type(trainer.optimizer).__name__ == "SGDWithFullModelGradientClip"
    guards = [h for h in trainer._hooks if isinstance(h, DivergenceGuard)]
    assert len(guards) == 1 and guards[0]._period == 20  # LIBRAGHM.FINITE_CHECK_PERIOD
    losses = [m for m in _metrics(out) if "total_loss" in m]
    assert [m["iteration"] for m in losses] == [0, 1]
    keys = ("loss_cls", "loss_box_reg", "total_loss")
    assert all(math.isfinite(m[k]) for m in losses for k in keys)
    state = torch.load(out / "model_final.pth", map_location="cpu")
    assert float(state["model"]["cls_loss.acc_count"].sum()) > 0  # GHM-C's histogram was updated
    assert int(state["iteration"]) == 1
    # --resume continues from the last checkpoint (iteration 2), to a longer max_iter
    resumed = script.main(_args("ghm_retinanet", tiny_lazy_opts(out, 3), "--resume"))
    assert resumed.start_iter == 2 and resumed.iter == 3
    assert [m["iteration"] for m in _metrics(out) if "total_loss" in m] == [0, 1, 2]


def test_lazy_resume_is_bit_identical(tmp_path):
    """The LazyConfig path resumes exactly too: 2 iterations + resume to 4 == 4 straight (two
    loader workers, random flips and scales, IoU-balanced sampling)."""
    script = _script()

    def run(out, *flags):
        opts = tiny_lazy_opts(out, 4, "train.checkpointer.period=2", "dataloader.train.num_workers=2",
                              "dataloader.train.mapper.augmentations.0.short_edge_length=[112,128,144]")
        return script.main(_args("libra_faster_rcnn", opts, *flags))

    straight = run(tmp_path / "straight").model.state_dict()
    out = tmp_path / "resumed"
    run(out)
    (out / "last_checkpoint").write_text("model_0000001.pth")
    resumed = run(out, "--resume")
    assert resumed.start_iter == 2
    weights = resumed.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in straight.items())


def test_make_small_resnet_is_the_yaml_backbone():
    """The plain-arguments small ResNet is the yaml builder's network, and checks its arguments."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY

    from libraghm.backbone.small_resnet import PARAMS, make_small_resnet

    cfg = get_config(
        "Shapes-Detection/faster_rcnn_small_R_FPN.yaml",
        "MODEL.SMALL_RESNET.WIDTHS", [8, 16, 24, 40], "MODEL.SMALL_RESNET.BLOCKS", [2, 1, 3, 1],
        "MODEL.RESNETS.OUT_FEATURES", ["res2", "res4"], "MODEL.BACKBONE.FREEZE_AT", 2,
    )
    torch.manual_seed(1)
    yaml_net = BACKBONE_REGISTRY.get("build_small_resnet_backbone")(cfg, ShapeSpec(channels=3))
    torch.manual_seed(1)
    net = make_small_resnet(ListConfig([8, 16, 24, 40]), (2, 1, 3, 1), norm="BN",
                            out_features=["res2", "res4"], freeze_at=2)
    assert differences(yaml_net, net) == {}
    ys, ns = yaml_net.state_dict(), net.state_dict()
    assert list(ys) == list(ns) and all(torch.equal(ys[k], ns[k]) for k in ys)
    assert "res5" not in dict(net.named_children())  # stages after the last output are not built
    assert not any(p.requires_grad for p in net.res2.parameters())  # freeze_at 2: stem and res2
    assert all(p.requires_grad for p in net.res3.parameters())
    with pytest.raises(ValueError, match=re.escape(PARAMS["widths"].describe())) as err:
        make_small_resnet([16, 32, 64])
    assert str(err.value).startswith("widths = [16, 32, 64] is invalid")
