"""GHM-C and GHM-R: gradient harmonizing losses (Li, Liu and Wang, "Gradient Harmonized Single-stage
Detector", AAAI 2019, arXiv 1811.05181).

Every sample (one logit of one anchor for GHM-C, one box coordinate for GHM-R) has a gradient norm
``g`` in [0, 1]. [0, 1] is cut into ``M`` equal bins; the *gradient density* of a sample is the
(moving-average) number of samples in its bin divided by the bin width ``1/M``, and its loss weight
is the harmonizing parameter

    beta_i = N / GD(g_i) = N / (M * S_b(i)),

``N`` being the number of samples and ``S_b`` the moving-average count of bin ``b``. A uniform
histogram gives ``beta = 1`` everywhere; crowded bins (the mass of easy negatives, and the
outliers) are down-weighted. Both losses are ``sum_i beta_i * L_i / N``.

Counts are a moving average over iterations, ``S_b <- m S_b + (1 - m) R_b``, from zero (the paper's
default; ``bias_correction`` divides it by ``1 - m^t``), updated only for the bins that hold samples.
The histogram is one fixed-size accumulation (``scatter_add_``) with no host synchronisation; the counts are float64 buffers (saved in
checkpoints) summed across processes; label weights are real weights; ``per_level`` and
``mmdet_compat`` reproduce mmdetection; NaN/Inf predictions are skipped like ignored samples
(``nonfinite="skip"``; if every valid one is, the loss is NaN so that training stops) or raise. docs/ghm.md details each of these behaviours.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from detectron2.layers import cat
from detectron2.utils import comm

from ..validation import Bool, Float, Int, OneOf, check_params, read_params
from .box_regression import BoxRegressionLoss, _cat_anchors
from .classification import ClassificationLoss
from .registry import BOX_REG_LOSS_REGISTRY, CLASSIFICATION_LOSS_REGISTRY

__all__ = ["GHMC", "GHMR", "GradientHarmonizer", "encode_box_deltas"]

#: Valid values of the settings GHM-C and GHM-R share (also of the MODEL.GHM_C / GHM_R keys).
HARMONIZER_PARAMS = {
    "bins": Int(low=1),
    "momentum": Float(0.0, 1.0, high_open=True),
    "loss_weight": Float(low=0.0),
    "bias_correction": Bool(),
    "per_level": Bool(),
    "mmdet_compat": Bool(),
    "sync_counts": Bool(),
    "nonfinite": OneOf("skip", "error"),
    "max_weight": Float(low=0.0),
}


def encode_box_deltas(anchors, gt_boxes, weights):
    """
    The R-CNN box parametrisation (dx, dy, dw, dh) of ``gt_boxes`` relative to ``anchors``, the
    same numbers as ``Box2BoxTransform(weights).get_deltas`` but for all images at once and without
    its host-synchronising validity assert.

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
    return torch.stack(
        [wx * shift[..., 0], wy * shift[..., 1], ww * scale[..., 0], wh * scale[..., 1]], dim=-1
    )


class GradientHarmonizer(nn.Module):
    """
    The part GHM-C and GHM-R share: the gradient-norm histogram, its moving average and the
    harmonizing weights. Subclasses define the per-sample loss and gradient norm.

    Buffers:
        acc_count (float64, (bins,)): moving-average count per bin (summed over processes).
        num_updates (int64, (bins,)): number of moving-average updates of each bin so far (``t`` of
            the bias correction); a bin is updated only in iterations where it holds samples.
        num_nonfinite (int64, (), not saved): non-finite predictions dropped so far ("skip" mode).
    """

    PARAMS = HARMONIZER_PARAMS

    def __init__(
        self,
        bins,
        momentum,
        loss_weight=1.0,
        bias_correction=False,
        per_level=False,
        mmdet_compat=False,
        sync_counts=True,
        nonfinite="skip",
        max_weight=0.0,
    ):
        """
        Args:
            bins (int): number of equal bins ``M`` on [0, 1], >= 1.
            momentum (float): moving-average momentum in [0, 1); 0 uses the current batch only.
            loss_weight (float): factor on the returned loss, >= 0.
            bias_correction (bool): divide the moving average by ``1 - momentum^t`` (not in the
                paper, whose average starts from zero).
            per_level (bool): when ``level_sizes`` are given, run once per pyramid level
                (mmdetection's behaviour) instead of once over the whole batch.
            mmdet_compat (bool): reproduce mmdetection's weight details (see the module docstring).
            sync_counts (bool): sum the bin counts over all processes before use.
            nonfinite (str): "skip" or "error", what to do with NaN/Inf predictions.
            max_weight (float): upper bound of a bin's harmonizing weight ``beta`` (not in the
                paper); 0 = no bound. 1 lets GHM only down-weight (crowded bins), never up-weight
                a sample above its plain loss, which keeps the class prior (docs/ghm.md).
        """
        super().__init__()
        check_params(
            HARMONIZER_PARAMS, bins=bins, momentum=momentum, loss_weight=loss_weight,
            bias_correction=bias_correction, per_level=per_level, mmdet_compat=mmdet_compat,
            sync_counts=sync_counts, nonfinite=nonfinite, max_weight=max_weight,
        )
        self.bins = int(bins)
        self.momentum = float(momentum)
        self.loss_weight = float(loss_weight)
        self.bias_correction = bias_correction and not mmdet_compat
        self.per_level = per_level
        self.mmdet_compat = mmdet_compat
        self.sync_counts = sync_counts
        self.nonfinite = nonfinite
        self.max_weight = float(max_weight)
        self.register_buffer("acc_count", torch.zeros(self.bins, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros(self.bins, dtype=torch.int64))
        self.register_buffer("num_nonfinite", torch.zeros((), dtype=torch.int64), persistent=False)
        self.last_bin_weights = None  # beta per bin of the last call (float64), for inspection

    @classmethod
    def from_config(cls, cfg, head_key=None):
        """
        Args:
            cfg (CfgNode): the model config; reads ``cls.CONFIG_NODE`` (MODEL.GHM_C / MODEL.GHM_R).
            head_key (str): the head using the loss (unused: one node per loss).

        Returns:
            the loss.
        """
        return cls(**read_params(cfg, cls.CONFIG_NODE, cls.PARAMS))

    def extra_repr(self):
        return (
            f"bins={self.bins}, momentum={self.momentum}, loss_weight={self.loss_weight}, "
            f"bias_correction={self.bias_correction}, per_level={self.per_level}, "
            f"mmdet_compat={self.mmdet_compat}, sync_counts={self.sync_counts}, "
            f"max_weight={self.max_weight}"
        )

    def _apply(self, fn, *args, **kwargs):
        # Keep the statistics in float64 whatever the model is cast to (``model.half()`` would
        # otherwise turn counts above 65504 into inf); devices still follow ``fn``.
        acc = self.acc_count
        out = super()._apply(fn, *args, **kwargs)
        if self.acc_count.dtype != torch.float64:
            self.acc_count = acc.to(device=self.acc_count.device, dtype=torch.float64)
        return out

    # ------------------------------------------------------------------------------------------
    def bin_index(self, g, keep):
        """
        Args:
            g (Tensor): gradient norms in [0, 1] (no grad).
            keep (Tensor[bool]): samples that take part (broadcastable to ``g``).

        Returns:
            Tensor[int32]: bin of every sample, ``bins`` (one past the last) for samples left out.
        """
        idx = (g * self.bins).to(torch.int32).clamp_(max=self.bins - 1)
        return torch.where(keep, idx, self.bins)

    @torch.no_grad()
    def harmonizing_weights(self, bin_index, sample_weight=None, update=True):
        """
        Histogram the samples, update the moving average (training mode only) and return the
        harmonizing parameter of every bin.

        Args:
            bin_index (Tensor[int32 or int64]): from :meth:`bin_index`; ``bins`` marks samples
                left out.
            sample_weight (Tensor or None): real-valued weight of each sample (same shape), or None
                for weight 1.
            update (bool): update the moving average (in training mode); False for read-only
                passes (OHEM's ranking).

        Returns:
            beta (Tensor): float64 (bins,), ``N / (M * S_b)`` (``N / (n_nonempty * S_b)`` in
                mmdetection-compatible mode), at most ``max_weight`` when that is > 0; 0 for bins
                with no mass.
            num_samples (Tensor): float64 scalar ``N``, the (weighted, global) number of samples.
        """
        M = self.bins
        flat = bin_index.reshape(-1).to(torch.int64)
        if sample_weight is None:
            w = torch.ones(flat.shape, dtype=torch.float64, device=flat.device)
        else:
            w = sample_weight.reshape(-1).to(torch.float64)
        # A fixed-size accumulation: unlike torch.bincount it reads nothing back to the host on
        # CUDA (bincount syncs for the input's range) and has a deterministic CUDA mode.
        counts = torch.zeros(M + 1, dtype=torch.float64, device=flat.device)
        counts = counts.scatter_add_(0, flat, w)[:M]
        if self.sync_counts and comm.get_world_size() > 1:
            dist.all_reduce(counts)  # one vector of M numbers; N is its sum
        num_samples = counts.sum()
        present = counts > 0
        m = self.momentum

        if self.training and update:
            # Bins that are empty in this batch are left as they are (not decayed).
            self.acc_count.copy_(
                torch.where(present, m * self.acc_count + (1 - m) * counts, self.acc_count)
            )
            self.num_updates.add_(present.to(torch.int64))

        t = self.num_updates.to(torch.float64)
        if self.bias_correction:
            smoothed = self.acc_count / (1.0 - torch.pow(m, t)).clamp_min(1e-300)
        else:
            smoothed = self.acc_count
        # Bins the average has never seen (evaluation mode with fresh statistics) use the current
        # counts.
        smoothed = torch.where(t > 0, smoothed, counts)

        # (a Python number where possible: no host-to-device copy)
        denom = present.sum().clamp_min(1).to(torch.float64) if self.mmdet_compat else float(M)
        beta = torch.where(smoothed > 0, num_samples / (denom * smoothed.clamp_min(1e-300)), 0.0)
        if self.max_weight > 0:
            beta = beta.clamp(max=self.max_weight)
        if update:
            self.last_bin_weights = beta
        return beta, num_samples

    def _sample_factors(self, bin_index, sample_weight, dtype, update=True):
        """
        Per-sample factor ``weight_i * beta_b(i) / N_local`` (0 for samples left out), where
        ``N_local = N / world_size`` when counts are summed across processes.
        """
        if sample_weight is not None:
            sample_weight = sample_weight.expand_as(bin_index)
        beta, num_samples = self.harmonizing_weights(bin_index, sample_weight, update)
        norm = num_samples
        if self.sync_counts:
            norm = norm / comm.get_world_size()
        scale = torch.where(norm > 0, 1.0 / norm.clamp_min(1e-300), 0.0)
        table = torch.cat([beta * scale, beta.new_zeros(1)]).to(dtype)
        factors = table.index_select(0, bin_index.reshape(-1)).view(bin_index.shape)
        if sample_weight is not None:
            factors = factors * sample_weight.to(dtype)
        return factors

    def _prepare(self, pred, target, label_weight):
        """Common input handling: compute dtype, validity mask, real weights (or None)."""
        dtype = torch.promote_types(pred.dtype, torch.float32)
        if label_weight is None:
            valid, weight = None, None
        elif label_weight.dtype == torch.bool:
            valid, weight = label_weight, None
        else:
            valid = label_weight > 0
            weight = None if self.mmdet_compat else label_weight.to(dtype)
        return dtype, valid, weight

    def _keep_mask(self, finite, valid, name):
        """
        Samples that enter the histogram and the loss; applies the non-finite policy.

        Returns:
            keep (Tensor[bool]): the valid, finite samples.
            alarm (Tensor): 0-dim, NaN when there were valid samples and every one was non-finite
                (added to the loss, so that the trainer stops instead of taking a loss of 0), else 0.
        """
        if valid is None:
            keep, num_valid = finite, finite.numel()
        else:
            keep = finite & valid
            num_valid = valid.sum() * (finite.numel() // max(valid.numel(), 1))
        num_kept = keep.sum()
        num_bad = num_valid - num_kept  # non-finite among the valid samples
        if self.nonfinite == "error":
            num_bad = int(num_bad)  # host sync, only in this mode
            if num_bad:
                raise FloatingPointError(
                    f"{name}: {num_bad} non-finite (NaN/Inf) predictions among the valid samples. "
                    f"Training has probably diverged; set NONFINITE='skip' to drop such samples."
                )
        else:
            self.num_nonfinite.add_(num_bad)
        everything_skipped = (num_kept == 0) & (num_bad > 0)
        zero = torch.zeros((), dtype=torch.float32, device=finite.device)
        return keep, torch.where(everything_skipped, torch.full_like(zero, float("nan")), zero)

    def _per_sample(self, pred, target, label_weight):
        """Return the summed, harmonized loss of one group of samples. Implemented by subclasses."""
        raise NotImplementedError

    def harmonize(self, pred, target, label_weight=None, level_sizes=None):
        """
        Args:
            pred (Tensor): predictions (any float dtype).
            target (Tensor): targets, same shape as ``pred``.
            label_weight (Tensor or None): bool mask or real weights broadcastable to ``pred``
                (0 / False = ignored). None: every sample has weight 1.
            level_sizes (list[int] or None): sizes of the pyramid levels along dim 1 of ``pred``
                (e.g. ``pred`` of shape (images, anchors, classes)). Only used in per-level mode.

        Returns:
            Tensor: scalar loss (float32, or float64 for float64 inputs), times ``loss_weight``.
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"{type(self).__name__}: pred and target must have the same shape, "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        with torch.autocast(device_type=pred.device.type, enabled=False):
            if self.per_level and level_sizes is not None:
                if label_weight is not None:
                    label_weight = torch.broadcast_to(label_weight, pred.shape)
                preds = pred.split(list(level_sizes), dim=1)
                targets = target.split(list(level_sizes), dim=1)
                weights = (
                    [None] * len(preds)
                    if label_weight is None
                    else label_weight.split(list(level_sizes), dim=1)
                )
                loss = sum(self._per_sample(p, t, w) for p, t, w in zip(preds, targets, weights))
            else:
                loss = self._per_sample(pred, target, label_weight)
        return loss * self.loss_weight


@CLASSIFICATION_LOSS_REGISTRY.register()
class GHMC(GradientHarmonizer, ClassificationLoss):
    """
    "ghm_c": sigmoid binary cross-entropy with gradient-harmonizing weights. The gradient norm of a
    logit is ``g = |sigmoid(x) - target|``. Paper defaults: 30 bins, momentum 0.75. Normalised by
    its own (weighted) number of samples; settings from ``MODEL.GHM_C``.
    """

    name = "ghm_c"
    normalized = True
    CONFIG_NODE = "MODEL.GHM_C"

    def __init__(self, bins=30, momentum=0.75, loss_weight=1.0, **kwargs):
        """
        Args:
            bins, momentum, loss_weight, kwargs: see :class:`GradientHarmonizer`.
        """
        super().__init__(bins, momentum, loss_weight, **kwargs)

    @staticmethod
    def gradient_norm(logits, target):
        """``|sigmoid(x) - target|``, the norm of d BCE / d x."""
        return (torch.sigmoid(logits) - target).abs()

    def forward(self, logits, targets, valid, level_sizes=None):
        """
        The dense heads' classification loss (:class:`ClassificationLoss`).

        Args:
            logits, targets (Tensor): (N, R, K).
            valid (Tensor[bool]): (N, R), anchors that are not ignored.
            level_sizes (list[int] or None): anchors per level (used in per-level mode).

        Returns:
            Tensor: scalar, normalised loss times ``loss_weight``.
        """
        return self.harmonize(logits, targets, valid.unsqueeze(-1), level_sizes)

    def _per_sample(self, pred, target, label_weight):
        dtype, valid, weight = self._prepare(pred, target, label_weight)
        x = pred.to(dtype)
        t = target.to(dtype)
        with torch.no_grad():
            finite = torch.isfinite(x)
            keep, alarm = self._keep_mask(finite, valid, "GHM-C")
            idx = self.bin_index(self.gradient_norm(x, t), keep)
        factors = self._sample_factors(idx, weight, dtype)
        x = torch.where(finite, x, torch.zeros((), dtype=dtype, device=x.device))
        return F.binary_cross_entropy_with_logits(x, t, weight=factors, reduction="sum") + alarm


@BOX_REG_LOSS_REGISTRY.register()
class GHMR(GradientHarmonizer, BoxRegressionLoss):
    """
    "ghm_r": authentic smooth L1 ``ASL1(d) = sqrt(d^2 + mu^2) - mu`` of the box deltas with
    gradient-harmonizing weights; the gradient norm of a coordinate is ``|d| / sqrt(d^2 + mu^2)``
    in [0, 1). Paper defaults: mu 0.02, 10 bins, momentum 0.7, loss weight 10 (RetinaNet).
    Normalised by the sum of regression weights (4 x foreground boxes); settings from
    ``MODEL.GHM_R``.
    """

    name = "ghm_r"
    normalized = True
    CONFIG_NODE = "MODEL.GHM_R"
    PARAMS = dict(HARMONIZER_PARAMS, mu=Float(low=0.0, low_open=True))

    def __init__(self, mu=0.02, bins=10, momentum=0.7, loss_weight=10.0, **kwargs):
        """
        Args:
            mu (float): the ASL1 parameter, > 0.
            bins, momentum, loss_weight, kwargs: see :class:`GradientHarmonizer`.
        """
        super().__init__(bins, momentum, loss_weight, **kwargs)
        self.mu = check_params(self.PARAMS, mu=mu)["mu"]

    def extra_repr(self):
        return f"mu={self.mu}, " + super().extra_repr()

    def gradient_norm(self, diff):
        """``|d| / sqrt(d^2 + mu^2)``, the norm of d ASL1 / d d (1 where ``d^2`` would overflow)."""
        big, safe = self._split_huge(diff)
        return torch.where(big, 1.0, safe.abs() / torch.sqrt(safe * safe + self.mu * self.mu))

    def asl1(self, diff):
        """``sqrt(d^2 + mu^2) - mu``, as ``|d| - mu`` where ``d^2`` would overflow (equal there)."""
        big, safe = self._split_huge(diff)
        return torch.where(big, diff.abs() - self.mu,
                           torch.sqrt(safe * safe + self.mu * self.mu) - self.mu)

    @staticmethod
    def _split_huge(diff):
        # Beyond 1e15, sqrt(d^2 + mu^2) == |d| in float32/64; d^2 overflows float32 beyond ~1.8e19.
        big = diff.abs() > 1e15
        return big, torch.where(big, torch.zeros((), dtype=diff.dtype, device=diff.device), diff)

    def forward(self, anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask):
        """
        The heads' box-regression loss (:class:`BoxRegressionLoss`), normalised.

        Targets are encoded for every anchor (no boolean indexing, no host sync); those of
        anchors outside ``fg_mask`` are masked out (they may be meaningless, even inf).

        Args: as :meth:`BoxRegressionLoss.forward`.

        Returns:
            Tensor: scalar loss times ``loss_weight``.
        """
        pred = cat(list(pred_anchor_deltas), dim=1)  # (N, R, 4)
        target = encode_box_deltas(
            _cat_anchors(anchors), torch.stack(list(gt_boxes)), box2box_transform.weights
        )
        if fg_mask is Ellipsis:
            fg_mask = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
        level_sizes = [x.shape[1] for x in pred_anchor_deltas]
        return self.harmonize(pred, target, fg_mask.unsqueeze(-1), level_sizes)

    @torch.no_grad()
    def per_box(self, proposal_boxes, gt_boxes, pred_deltas, box2box_transform):
        """
        Every box's share of the loss, with weights from this batch's histogram and the current
        moving average, which is not updated: the shares sum to what :meth:`forward` returns
        with the same statistics (in evaluation mode, or before its update in training).
        """
        diff = pred_deltas.float() - box2box_transform.get_deltas(proposal_boxes, gt_boxes).float()
        finite = torch.isfinite(diff)
        idx = self.bin_index(self.gradient_norm(diff), finite)
        factors = self._sample_factors(idx, None, diff.dtype, update=False)
        diff = torch.where(finite, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
        asl1 = self.asl1(diff)
        return (asl1 * factors).sum(dim=1) * self.loss_weight

    def _per_sample(self, pred, target, label_weight):
        dtype, valid, weight = self._prepare(pred, target, label_weight)
        diff = pred.to(dtype) - target.to(dtype)
        with torch.no_grad():
            finite = torch.isfinite(diff)
            keep, alarm = self._keep_mask(finite, valid, "GHM-R")
            idx = self.bin_index(self.gradient_norm(diff), keep)
        factors = self._sample_factors(idx, weight, dtype)
        # Samples left out (ignored or non-finite) become d = 0 so that they add exactly 0 with
        # zero gradient (0 * inf would be NaN).
        diff = torch.where(keep, diff, torch.zeros((), dtype=dtype, device=diff.device))
        asl1 = self.asl1(diff)
        return (asl1 * factors).sum() + alarm
