"""LibraGHM's box-regression loss types, selectable next to Detectron2's own types.

Usage from yaml (any of the three keys, independently)::

    MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE: "balanced_l1"   # FastRCNNOutputLayers (ROI box head)
    MODEL.RPN.BBOX_REG_LOSS_TYPE: "balanced_l1"            # RPN
    MODEL.RETINANET.BBOX_REG_LOSS_TYPE: "balanced_l1"      # RetinaNet
    LIBRAGHM.BALANCED_L1: {ALPHA: 0.5, GAMMA: 1.5, BETA: 1.0, MMDET_COMPAT: False}

Detectron2's type-specific SMOOTH_L1_BETA keys are not read by "balanced_l1"; its threshold is
LIBRAGHM.BALANCED_L1.BETA (one value shared by every head that uses the type).

How it is plugged in, and exactly what is replaced (installed once, when this module is imported)
-----------------------------------------------------------------------------------------------
Detectron2 computes every box-regression loss of FastRCNNOutputLayers (``box_reg_loss``), RPN
(``losses``) and RetinaNet (``losses``) with one function,
``detectron2.modeling.box_regression._dense_box_regression_loss``, which dispatches on the loss
type name ("smooth_l1", "giou", "diou", "ciou") and has no extension point. The modules
``roi_heads/fast_rcnn.py``, ``proposal_generator/rpn.py`` and ``meta_arch/retinanet.py`` import it
by name. The smallest change that makes a new type usable by those stock classes AND by every
subclass of them (LibraGHM's own ROI heads, RPN and RetinaNet subclasses inherit these methods) is:

1. ``_dense_box_regression_loss`` is rebound to :func:`dense_box_regression_loss` in those four
   module namespaces (box_regression, fast_rcnn, rpn, retinanet). The dispatcher handles the names
   in :data:`BOX_REG_LOSS_REGISTRY` and passes every other call, arguments unchanged, to the
   original Detectron2 function (kept as :data:`D2_DENSE_BOX_REGRESSION_LOSS`), so Detectron2's own
   types give bit-identical losses and gradients. A name that neither knows raises ValueError
   listing the valid names. ``meta_arch/fcos.py`` is left alone (it always uses "giou").
2. ``from_config`` of ``FastRCNNOutputLayers``, ``RPN`` and ``RetinaNet`` is wrapped (the
   original is called first, its result is only post-processed; subclasses that call
   ``super().from_config`` get the same). This is the model-build hook: if the head's
   ``box_reg_loss_type`` is a LibraGHM type, its LIBRAGHM.* config keys are validated (bad values
   raise ValueError naming the key at model build time) and the name is replaced by a
   :class:`BoxRegLossType` — a ``str`` equal to the name that also carries the validated
   parameters, which is how they reach the loss at call time without global state (two models with
   different settings can coexist). An unknown type name also fails here, naming the config key.
   Detectron2's own type names pass through untouched.

Normalisation is Detectron2's: the dispatcher returns the SUM of the per-element loss over the
foreground boxes' deltas (as Detectron2 does for "smooth_l1", on the same
``box2box_transform.get_deltas`` targets), and each caller divides by its own normaliser as before
(ROI head: number of sampled regions; RPN: anchors per image x images; RetinaNet: EMA of
positives). Swapping the type therefore changes only the per-element loss. (Targets are encoded
only for the foreground boxes, which is cheaper than encoding every anchor.)

Limits: code that bound ``_dense_box_regression_loss`` by name BEFORE libraghm was imported keeps
Detectron2's function (which rejects LibraGHM's names); look it up through the module at call time
(``rpn._dense_box_regression_loss(...)``) or import libraghm first. Code that needs the loss per
box (e.g. OHEM's ranking) can use :func:`box_reg_loss_elementwise`.

Adding another LibraGHM type: :func:`register_box_reg_loss_type`.
"""
import functools
from types import MappingProxyType
from typing import Callable, Dict, Mapping, Optional

import torch

from detectron2.modeling import box_regression as _d2_box_regression
from detectron2.modeling.meta_arch import retinanet as _d2_retinanet
from detectron2.modeling.proposal_generator import rpn as _d2_rpn
from detectron2.modeling.roi_heads import fast_rcnn as _d2_fast_rcnn
from detectron2.structures import Boxes

from .balanced_l1_loss import balanced_l1_loss, check_balanced_l1_params

__all__ = [
    "BoxRegLossType",
    "BOX_REG_LOSS_REGISTRY",
    "D2_BOX_REG_LOSS_TYPES",
    "D2_DENSE_BOX_REGRESSION_LOSS",
    "dense_box_regression_loss",
    "dense_box_regression_deltas",
    "box_reg_loss_elementwise",
    "register_box_reg_loss_type",
    "resolve_box_reg_loss_type",
    "install",
]

#: The names Detectron2's ``_dense_box_regression_loss`` handles itself.
D2_BOX_REG_LOSS_TYPES = ("smooth_l1", "giou", "diou", "ciou")

# The original Detectron2 function (also correct when this module is reloaded after install()).
D2_DENSE_BOX_REGRESSION_LOSS = getattr(
    _d2_box_regression._dense_box_regression_loss,
    "_libraghm_original",
    _d2_box_regression._dense_box_regression_loss,
)


class _BoxRegLossEntry:
    """One registered loss type: its delta-space loss and how to read its parameters."""

    def __init__(self, name: str, loss_fn: Callable, params_from_cfg: Callable):
        self.name = name
        self.loss_fn = loss_fn
        self.params_from_cfg = params_from_cfg


#: name -> entry, for LibraGHM's box-regression loss types.
BOX_REG_LOSS_REGISTRY: Dict[str, _BoxRegLossEntry] = {}


def register_box_reg_loss_type(name: str, loss_fn: Callable, params_from_cfg: Callable):
    """
    Register a box-regression loss type usable through MODEL.*.BBOX_REG_LOSS_TYPE.

    Args:
        name (str): the type name used in yaml; must not be one of Detectron2's names.
        loss_fn (callable): ``loss_fn(pred_deltas, target_deltas, **params) -> Tensor``, both
            deltas of shape (P, box_dim); returns the per-element loss, same shape (the
            dispatcher sums it; the callers normalise). Its keyword defaults are used when a head
            is built without a config (plain name passed to ``__init__``).
        params_from_cfg (callable): ``params_from_cfg(cfg) -> dict`` of keyword arguments for
            ``loss_fn``; it must validate them and raise ValueError naming the config key. It runs
            when a head using the type is built.

    Returns:
        None
    """
    if name in D2_BOX_REG_LOSS_TYPES:
        raise ValueError(f"'{name}' is one of Detectron2's own box-regression loss types.")
    if name in BOX_REG_LOSS_REGISTRY:
        raise ValueError(f"Box-regression loss type '{name}' is already registered.")
    BOX_REG_LOSS_REGISTRY[name] = _BoxRegLossEntry(name, loss_fn, params_from_cfg)


class BoxRegLossType(str):
    """
    A box-regression loss type name (a ``str``, equal to the plain name) carrying its parameters.

    Built by :func:`resolve_box_reg_loss_type` at model build time, or directly, e.g.
    ``FastRCNNOutputLayers(..., box_reg_loss_type=BoxRegLossType("balanced_l1", beta=0.11))``.
    """

    def __new__(cls, name: str, params: Optional[Mapping] = None, **kwargs):
        """
        Args:
            name (str): a registered LibraGHM type name.
            params (Mapping, optional) and kwargs: keyword arguments for the type's loss.

        Returns:
            BoxRegLossType
        """
        obj = super().__new__(cls, name)
        merged = dict(params or {})
        merged.update(kwargs)
        obj.params = MappingProxyType(merged)
        return obj

    def __reduce__(self):
        return (BoxRegLossType, (str(self), dict(self.params)))

    def __deepcopy__(self, memo):
        return BoxRegLossType(str(self), dict(self.params))


def _valid_names() -> str:
    return ", ".join(repr(n) for n in D2_BOX_REG_LOSS_TYPES + tuple(BOX_REG_LOSS_REGISTRY))


def resolve_box_reg_loss_type(name, cfg, cfg_key: str):
    """
    Resolve a head's loss type at model build time (called by the wrapped ``from_config``).

    Args:
        name (str): the type name the head's ``from_config`` produced.
        cfg (CfgNode): the model config.
        cfg_key (str): the config key the name came from, for error messages.

    Returns:
        str: ``name`` unchanged for Detectron2's types; a :class:`BoxRegLossType` with validated
        parameters for LibraGHM's types.

    Raises:
        ValueError: unknown type name, or bad parameters (naming the config key).
    """
    plain = str(name)
    entry = BOX_REG_LOSS_REGISTRY.get(plain)
    if entry is not None:
        return BoxRegLossType(plain, entry.params_from_cfg(cfg))
    if plain in D2_BOX_REG_LOSS_TYPES:
        return name
    raise ValueError(
        f"{cfg_key} = {plain!r} is not a box-regression loss type; valid: {_valid_names()}."
    )


def box_reg_loss_elementwise(box_reg_loss_type, pred_deltas, target_deltas):
    """
    Per-element loss of a LibraGHM box-regression type, with the parameters the type carries.

    For code that needs the loss per box (e.g. OHEM's ranking:
    ``box_reg_loss_elementwise(predictor.box_reg_loss_type, pred, target).sum(dim=1)``).

    Args:
        box_reg_loss_type (str): a registered LibraGHM type name or :class:`BoxRegLossType`.
        pred_deltas, target_deltas (Tensor): (P, box_dim) predicted and target deltas.

    Returns:
        Tensor: (P, box_dim) loss; its sum is what the dispatcher returns.
    """
    entry = BOX_REG_LOSS_REGISTRY.get(str(box_reg_loss_type))
    if entry is None:
        raise ValueError(
            f"{box_reg_loss_type!r} is not a LibraGHM box-regression loss type; registered: "
            f"{', '.join(repr(n) for n in BOX_REG_LOSS_REGISTRY)}."
        )
    return entry.loss_fn(pred_deltas, target_deltas, **getattr(box_reg_loss_type, "params", {}))


def dense_box_regression_deltas(anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask):
    """
    Predicted and target deltas of the foreground boxes, for a delta-space loss.

    Args:
        anchors: #lvl anchor boxes (Boxes or Tensor), each (Ri, box_dim); R = sum(Ri).
        box2box_transform: Box2BoxTransform (or the rotated one) encoding targets.
        pred_anchor_deltas: #lvl tensors, each (N, Ri, box_dim).
        gt_boxes: N tensors, each (R, box_dim): the box matched to every anchor.
        fg_mask: (N, R) bool mask of the boxes to compute the loss on, or ``...`` for all.

    Returns:
        (Tensor, Tensor): predicted and target deltas, each (P, box_dim). Targets are computed
        only for the P foreground boxes.
    """
    if isinstance(anchors[0], Boxes):
        anchors = type(anchors[0]).cat(list(anchors)).tensor
    else:
        anchors = torch.cat(list(anchors), dim=0)
    box_dim = anchors.shape[-1]
    pred = torch.cat(list(pred_anchor_deltas), dim=1)  # (N, R, box_dim)
    matched = torch.stack(list(gt_boxes))  # (N, R, box_dim)
    sources = anchors.unsqueeze(0).expand_as(matched)
    pred, matched, sources = pred[fg_mask], matched[fg_mask], sources[fg_mask]
    target = box2box_transform.get_deltas(
        sources.reshape(-1, box_dim), matched.reshape(-1, box_dim)
    )
    return pred.reshape(-1, box_dim), target


def dense_box_regression_loss(
    anchors,
    box2box_transform,
    pred_anchor_deltas,
    gt_boxes,
    fg_mask,
    box_reg_loss_type="smooth_l1",
    smooth_l1_beta=0.0,
):
    """
    Drop-in replacement for Detectron2's ``_dense_box_regression_loss`` (same signature).

    Args:
        anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask: as in Detectron2's
            function (see :func:`dense_box_regression_deltas`).
        box_reg_loss_type (str): a Detectron2 type (delegated unchanged to Detectron2), or a
            LibraGHM type (a plain name uses the loss's default parameters; a
            :class:`BoxRegLossType` carries the configured ones).
        smooth_l1_beta (float): only used by Detectron2's "smooth_l1".

    Returns:
        Tensor: scalar, the loss summed over the foreground boxes (callers normalise).
    """
    entry = BOX_REG_LOSS_REGISTRY.get(str(box_reg_loss_type))
    if entry is None:
        try:
            return D2_DENSE_BOX_REGRESSION_LOSS(
                anchors,
                box2box_transform,
                pred_anchor_deltas,
                gt_boxes,
                fg_mask,
                box_reg_loss_type=box_reg_loss_type,
                smooth_l1_beta=smooth_l1_beta,
            )
        except ValueError as e:
            if box_reg_loss_type in D2_BOX_REG_LOSS_TYPES:
                raise
            raise ValueError(
                f"Invalid box regression loss type {box_reg_loss_type!r}; valid: {_valid_names()}."
            ) from e
    pred, target = dense_box_regression_deltas(
        anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask
    )
    return box_reg_loss_elementwise(box_reg_loss_type, pred, target).sum()


# (class, config key of its loss type) whose from_config is wrapped by install().
_HEADS = (
    (_d2_fast_rcnn.FastRCNNOutputLayers, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE"),
    (_d2_rpn.RPN, "MODEL.RPN.BBOX_REG_LOSS_TYPE"),
    (_d2_retinanet.RetinaNet, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"),
)
_PATCHED_MODULES = (_d2_box_regression, _d2_fast_rcnn, _d2_rpn, _d2_retinanet)


def _wrap_from_config(klass, cfg_key):
    original = klass.__dict__["from_config"].__func__
    original = getattr(original, "_libraghm_original", original)

    @functools.wraps(original)  # keeps the signature that @configurable inspects
    def from_config(cls, cfg, *args, **kwargs):
        ret = original(cls, cfg, *args, **kwargs)
        if "box_reg_loss_type" in ret:
            ret["box_reg_loss_type"] = resolve_box_reg_loss_type(
                ret["box_reg_loss_type"], cfg, cfg_key
            )
        return ret

    from_config._libraghm_original = original
    klass.from_config = classmethod(from_config)


def install():
    """
    Install the dispatcher and the build hooks described in the module docstring (idempotent).

    Returns:
        None
    """
    dense_box_regression_loss._libraghm_original = D2_DENSE_BOX_REGRESSION_LOSS
    for module in _PATCHED_MODULES:
        module._dense_box_regression_loss = dense_box_regression_loss
    for klass, cfg_key in _HEADS:
        _wrap_from_config(klass, cfg_key)


# ---------------------------------------------------------------------------------------------
# "balanced_l1" (Libra R-CNN)
# ---------------------------------------------------------------------------------------------
def _balanced_l1_params_from_cfg(cfg):
    if "LIBRAGHM" not in cfg or "BALANCED_L1" not in cfg.LIBRAGHM:
        raise ValueError(
            "The 'balanced_l1' box-regression loss reads LIBRAGHM.BALANCED_L1.*, which this config "
            "lacks: call libraghm.add_libraghm_config(cfg) before merging the yaml file."
        )
    c = cfg.LIBRAGHM.BALANCED_L1
    params = {"alpha": c.ALPHA, "gamma": c.GAMMA, "beta": c.BETA, "mmdet_compat": c.MMDET_COMPAT}
    check_balanced_l1_params(**params, key_prefix="LIBRAGHM.BALANCED_L1.")
    return params


register_box_reg_loss_type("balanced_l1", balanced_l1_loss, _balanced_l1_params_from_cfg)

install()
