"""GHM RetinaNet: RetinaNet trained with GHM-C (classification) and GHM-R (box regression).

Usage from yaml::

    MODEL.META_ARCHITECTURE: "GHMRetinaNet"
    LIBRAGHM.GHM_RETINANET.CLS_LOSS_TYPE: "ghm_c"   # or "focal"
    LIBRAGHM.GHM_RETINANET.BOX_LOSS_TYPE: "ghm_r"   # or "detectron2": BBOX_REG_LOSS_TYPE
    LIBRAGHM.GHMC: {BINS: 30, MOMENTUM: 0.75, LOSS_WEIGHT: 1.0, ...}
    LIBRAGHM.GHMR: {MU: 0.02, BINS: 10, MOMENTUM: 0.7, LOSS_WEIGHT: 10.0, ...}
"""
import torch
from fvcore.nn import sigmoid_focal_loss_jit

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch import retinanet as _d2_retinanet
from detectron2.structures import Boxes

from ..events import checked_log_period, log_gradient_norms, storage_to_log
from ..losses.ghm_loss import GHMC, GHMR

__all__ = ["GHMRetinaNet"]

CLS_LOSS_TYPES = ("ghm_c", "focal")
BOX_LOSS_TYPES = ("ghm_r", "detectron2")


def encode_box_deltas(anchors, gt_boxes, weights):
    """
    The R-CNN box parametrisation (dx, dy, dw, dh) of ``gt_boxes`` relative to ``anchors``, the
    same numbers as ``Box2BoxTransform(weights).get_deltas`` but for all images at once and without
    its host-synchronising validity assert (anchors from the anchor generator are valid).

    Args:
        anchors (Tensor): (R, 4) XYXY.
        gt_boxes (Tensor): (N, R, 4) XYXY, the box matched to every anchor of every image.
        weights (tuple[float]): (wx, wy, ww, wh).

    Returns:
        Tensor: (N, R, 4).
    """
    wx, wy, ww, wh = (float(v) for v in weights)
    a_size = anchors[:, 2:] - anchors[:, :2]
    a_ctr = anchors[:, :2] + 0.5 * a_size
    g_size = gt_boxes[..., 2:] - gt_boxes[..., :2]
    g_ctr = gt_boxes[..., :2] + 0.5 * g_size
    shift = (g_ctr - a_ctr) / a_size
    scale = torch.log(g_size / a_size)
    # Python-float weights: no host-to-device copy.
    return torch.stack(
        [wx * shift[..., 0], wy * shift[..., 1], ww * scale[..., 0], wh * scale[..., 1]], dim=-1
    )


@META_ARCH_REGISTRY.register()
class GHMRetinaNet(RetinaNet):
    """
    RetinaNet whose losses can be GHM-C and GHM-R. Only :meth:`RetinaNet.losses` is overridden
    (anchor labelling, head and inference are Detectron2's).

    - "ghm_c": GHM-C over every (valid anchor, class) logit of the batch, normalised by its own
      number of samples (as in the GHM paper), times LIBRAGHM.GHMC.LOSS_WEIGHT.
    - "ghm_r": GHM-R over the 4 deltas of every positive anchor, normalised by 4 x positives,
      times LIBRAGHM.GHMR.LOSS_WEIGHT.
    - "focal" / "detectron2": Detectron2's focal loss / MODEL.RETINANET.BBOX_REG_LOSS_TYPE,
      normalised as in Detectron2 (moving average of the number of positives).

    With "ghm_c" + "ghm_r" this ``losses`` makes no host synchronisation (so, unlike Detectron2's,
    it does not log ``num_pos_anchors``); the "focal" and "detectron2" paths use Detectron2's
    functions as they are, boolean indexing and validity asserts (host syncs) included.

    Every ``log_period`` iterations it logs the histogram of the classification gradient norms
    ``g = |sigmoid(x) - target|`` (``ghm_c/g_hist/<bin>``, with either loss) and GHM-C's weight
    per bin (``ghm_c/beta/<bin>``); likewise ``ghm_r/...`` for GHM-R. See :mod:`libraghm.events`.
    """

    @configurable
    def __init__(
        self,
        *,
        cls_loss_type="ghm_c",
        box_loss_type="ghm_r",
        ghm_c=None,
        ghm_r=None,
        log_period=0,
        log_bins=30,
        **kwargs,
    ):
        """
        Args:
            cls_loss_type (str): "ghm_c" or "focal".
            box_loss_type (str): "ghm_r" or "detectron2".
            ghm_c (GHMC or None): required for "ghm_c".
            ghm_r (GHMR or None): required for "ghm_r".
            log_period (int): log the gradient-norm histograms every this many iterations (0:
                never).
            log_bins (int): bins of the classification histogram when GHM-C is not used.
            kwargs: arguments of :class:`detectron2.modeling.RetinaNet`.
        """
        super().__init__(**kwargs)
        if cls_loss_type not in CLS_LOSS_TYPES:
            raise ValueError(
                f"LIBRAGHM.GHM_RETINANET.CLS_LOSS_TYPE must be one of {CLS_LOSS_TYPES}, "
                f"got {cls_loss_type!r}"
            )
        if box_loss_type not in BOX_LOSS_TYPES:
            raise ValueError(
                f"LIBRAGHM.GHM_RETINANET.BOX_LOSS_TYPE must be one of {BOX_LOSS_TYPES}, "
                f"got {box_loss_type!r}"
            )
        if (cls_loss_type == "ghm_c") != (ghm_c is not None):
            raise ValueError("GHMRetinaNet: pass a GHMC module exactly when cls_loss_type='ghm_c'")
        if (box_loss_type == "ghm_r") != (ghm_r is not None):
            raise ValueError("GHMRetinaNet: pass a GHMR module exactly when box_loss_type='ghm_r'")
        self.cls_loss_type = cls_loss_type
        self.box_loss_type = box_loss_type
        self.ghm_c = ghm_c
        self.ghm_r = ghm_r
        self.log_period = checked_log_period(log_period)
        self.log_bins = ghm_c.bins if ghm_c is not None else int(log_bins)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        c = cfg.LIBRAGHM.GHM_RETINANET
        ret["cls_loss_type"] = c.CLS_LOSS_TYPE
        ret["box_loss_type"] = c.BOX_LOSS_TYPE
        # Settings are validated here, at build time; only the losses in use are built.
        ret["ghm_c"] = GHMC.from_config(cfg) if c.CLS_LOSS_TYPE == "ghm_c" else None
        ret["ghm_r"] = GHMR.from_config(cfg) if c.BOX_LOSS_TYPE == "ghm_r" else None
        ret["log_period"] = cfg.LIBRAGHM.LOG_PERIOD
        ret["log_bins"] = cfg.LIBRAGHM.GHMC.BINS
        return ret

    def _positive_normalizer(self, positive):
        """Detectron2's RetinaNet normaliser (EMA of the positives), kept as a tensor: no sync."""
        num_pos = positive.sum().to(torch.float32).clamp_min(1.0)
        return self._ema_update("loss_normalizer", num_pos, 100)

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        Overrides :meth:`detectron2.modeling.RetinaNet.losses`; same arguments and return value
        ({"loss_cls", "loss_box_reg"}).
        """
        labels = torch.stack(gt_labels)  # (N, R): class, num_classes = background, -1 = ignored
        valid = labels >= 0
        positive = valid & (labels != self.num_classes)
        level_sizes = [x.shape[1] for x in pred_logits]
        normalizer = None
        deltas = None

        logits = cat(pred_logits, dim=1)  # (N, R, K)
        classes = torch.arange(self.num_classes, device=labels.device)
        targets = (labels.unsqueeze(-1) == classes).to(logits.dtype)  # background/ignored: all 0
        if self.cls_loss_type == "ghm_c":
            loss_cls = self.ghm_c(logits, targets, valid.unsqueeze(-1), level_sizes)
        else:
            normalizer = self._positive_normalizer(positive)
            loss_cls = sigmoid_focal_loss_jit(
                logits[valid],
                targets[valid],
                alpha=self.focal_loss_alpha,
                gamma=self.focal_loss_gamma,
                reduction="sum",
            ) / normalizer

        if self.box_loss_type == "ghm_r":
            target_deltas = encode_box_deltas(
                Boxes.cat(anchors).tensor, torch.stack(gt_boxes), self.box2box_transform.weights
            )  # (N, R, 4); meaningless (possibly inf) off the positives, which GHM-R masks out
            deltas = (cat(pred_anchor_deltas, dim=1), target_deltas)
            loss_box_reg = self.ghm_r(*deltas, positive.unsqueeze(-1), level_sizes)
        else:
            if normalizer is None:
                normalizer = self._positive_normalizer(positive)
            # Looked up at call time, so loss types added to Detectron2's dispatcher apply here too.
            loss_box_reg = _d2_retinanet._dense_box_regression_loss(
                anchors,
                self.box2box_transform,
                pred_anchor_deltas,
                gt_boxes,
                positive,
                box_reg_loss_type=self.box_reg_loss_type,
                smooth_l1_beta=self.smooth_l1_beta,
            ) / normalizer
        storage = storage_to_log(self.log_period)
        if storage is not None:
            self._log_gradient_norms(storage, logits, targets, valid, positive, deltas)
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg}

    @torch.no_grad()
    def _log_gradient_norms(self, storage, logits, targets, valid, positive, deltas):
        """Log the gradient-norm histograms (and GHM's weights) of this batch."""
        g = GHMC.gradient_norm(logits.float(), targets)
        log_gradient_norms(storage, "ghm_c", g, valid.unsqueeze(-1), self.log_bins, self.ghm_c)
        if deltas is not None:
            g = self.ghm_r.gradient_norm((deltas[0].float() - deltas[1].float())[positive])
            log_gradient_norms(storage, "ghm_r", g, None, self.ghm_r.bins, self.ghm_r)
