"""RetinaNet with a pluggable classification loss and box-regression loss.

    MODEL.META_ARCHITECTURE: "LibraGHMRetinaNet"
    MODEL.RETINANET.CLS_LOSS_TYPE: "ghm_c"       # or "focal" (Detectron2's)
    MODEL.RETINANET.BBOX_REG_LOSS_TYPE: "ghm_r"  # any name in BOX_REG_LOSS_REGISTRY
"""
import torch

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from ..events import checked_log_period, log_gradient_norms, log_score_collapse, storage_to_log
from ..losses import BOX_REG_LOSS_REGISTRY, CLASSIFICATION_LOSS_REGISTRY, build_loss
from ..losses import GHMC, GHMR, BoxRegressionLoss, ClassificationLoss, GradientHarmonizer
from ..losses.ghm_loss import encode_box_deltas
from ..losses.box_regression import _cat_anchors

__all__ = ["LibraGHMRetinaNet"]

#: Bins of the classification gradient-norm histogram that is logged when the loss is no GHM-C.
LOG_BINS = 30


@META_ARCH_REGISTRY.register()
class LibraGHMRetinaNet(RetinaNet):
    """
    RetinaNet whose losses are modules from LibraGHM's registries. Only :meth:`RetinaNet.losses`
    is overridden (anchor labelling, head and inference are Detectron2's).

    A loss that normalises itself (GHM-C: by its number of samples; GHM-R: by 4 x positives) is
    used as it is; the others are divided, as in Detectron2, by the moving average of the number
    of positive anchors, which is kept in the buffer ``loss_normalizer`` (so checkpoints hold it;
    float64, updated exactly as Detectron2's Python float) and makes no host synchronisation.
    With "focal" + "smooth_l1" the losses are Detectron2's.

    Every ``log_period`` iterations it logs ``num_pos_anchors``, the histogram of the
    classification gradient norms ``g = |sigmoid(x) - target|`` (``ghm_c/g_hist/<bin>``, with
    any loss) and GHM-C's weight per bin (``ghm_c/beta/<bin>``); likewise ``ghm_r/...`` with
    GHM-R, and ``ghm_c/top_scores_near_half``, with a warning when the highest scores all sit
    near 0.5. See :mod:`libraghm.events`.
    """

    @configurable
    def __init__(
        self,
        *,
        cls_loss: ClassificationLoss,
        box_reg_loss: BoxRegressionLoss,
        log_period: int = 0,
        **kwargs,
    ):
        """
        Args:
            cls_loss (ClassificationLoss): e.g. SigmoidFocalLoss or GHMC.
            box_reg_loss (BoxRegressionLoss): e.g. SmoothL1Loss, BalancedL1Loss or GHMR.
            log_period (int): log the statistics every this many iterations (0: never).
            kwargs: arguments of :class:`detectron2.modeling.RetinaNet` (``box_reg_loss_type``
                is taken from ``box_reg_loss``).
        """
        kwargs["box_reg_loss_type"] = box_reg_loss.name
        super().__init__(**kwargs)
        self.cls_loss = cls_loss
        self.box_reg_loss = box_reg_loss
        self.log_period = checked_log_period(log_period)
        self.register_buffer("loss_normalizer", torch.tensor(100.0, dtype=torch.float64))

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.pop("box_reg_loss_type")
        ret["cls_loss"] = build_loss(
            CLASSIFICATION_LOSS_REGISTRY, cfg, "MODEL.RETINANET", "CLS_LOSS_TYPE"
        )
        ret["box_reg_loss"] = build_loss(
            BOX_REG_LOSS_REGISTRY, cfg, "MODEL.RETINANET", "BBOX_REG_LOSS_TYPE"
        )
        ret["log_period"] = checked_log_period(cfg.LIBRAGHM.LOG_PERIOD, "LIBRAGHM.LOG_PERIOD")
        return ret

    def _apply(self, fn, *args, **kwargs):
        # Keep the normaliser in float64 when the model is cast (e.g. ``model.half()``).
        out = super()._apply(fn, *args, **kwargs)
        self.loss_normalizer = self.loss_normalizer.to(torch.float64)
        return out

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        Overrides :meth:`detectron2.modeling.RetinaNet.losses`; same arguments and return value
        ({"loss_cls", "loss_box_reg"}).
        """
        labels = torch.stack(gt_labels)  # (N, R): class, num_classes = background, -1 = ignored
        valid = labels >= 0
        positive = valid & (labels != self.num_classes)
        level_sizes = [x.shape[1] for x in pred_logits]
        logits = cat(pred_logits, dim=1)  # (N, R, K)
        classes = torch.arange(self.num_classes, device=labels.device)
        targets = (labels.unsqueeze(-1) == classes).to(logits.dtype)  # background/ignored: all 0
        loss_cls = self.cls_loss(logits, targets, valid, level_sizes)
        loss_box_reg = self.box_reg_loss(
            anchors, self.box2box_transform, pred_anchor_deltas, gt_boxes, positive
        )
        if not (self.cls_loss.normalized and self.box_reg_loss.normalized):
            num_pos = positive.sum().to(torch.float64).clamp_min(1.0)
            normalizer = self._ema_update("loss_normalizer", num_pos, 100).to(logits.dtype)
            if not self.cls_loss.normalized:
                loss_cls = loss_cls / normalizer
            if not self.box_reg_loss.normalized:
                loss_box_reg = loss_box_reg / normalizer
        storage = storage_to_log(self.log_period)
        if storage is not None:
            self._log_statistics(storage, anchors, logits, targets, valid, positive,
                                 pred_anchor_deltas, gt_boxes)
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg}

    @torch.no_grad()
    def _log_statistics(self, storage, anchors, logits, targets, valid, positive,
                        pred_anchor_deltas, gt_boxes):
        """Log the number of positives and the gradient-norm histograms (and GHM's weights)."""
        storage.put_scalar("num_pos_anchors", float(positive.sum()) / positive.shape[0])
        harmonizer = self.cls_loss if isinstance(self.cls_loss, GradientHarmonizer) else None
        bins = harmonizer.bins if harmonizer is not None else LOG_BINS
        g = GHMC.gradient_norm(logits.float(), targets)
        log_gradient_norms(storage, "ghm_c", g, valid.unsqueeze(-1), bins, harmonizer)
        log_score_collapse(storage, "ghm_c", logits, valid)
        if isinstance(self.box_reg_loss, GHMR):
            target = encode_box_deltas(
                _cat_anchors(anchors), torch.stack(list(gt_boxes)), self.box2box_transform.weights
            )
            diff = cat(list(pred_anchor_deltas), dim=1).float() - target.float()
            g = self.box_reg_loss.gradient_norm(diff[positive])
            log_gradient_norms(storage, "ghm_r", g, None, self.box_reg_loss.bins, self.box_reg_loss)
