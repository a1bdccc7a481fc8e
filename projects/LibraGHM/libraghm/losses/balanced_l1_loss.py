"""Balanced L1 loss (Libra R-CNN, Pang et al., arXiv 1904.02701, Sec. 3.3), element-wise.

Notation: ``x = |prediction - target|`` (one box-delta coordinate), ``alpha`` (0.5 in the paper),
``gamma`` (1.5) and ``b`` chosen so that the gradient is continuous where the loss turns linear::

    alpha * ln(b + 1) = gamma      =>      b = exp(gamma / alpha) - 1   (= e^3 - 1 = 19.0855...)

Paper form (threshold 1)::

    L(x) = alpha / b * (b*x + 1) * ln(b*x + 1) - alpha*x        if x < 1
    L(x) = gamma*x + C,   C = gamma / b - alpha                  otherwise

    dL/dx = alpha * ln(b*x + 1)  (0 at x = 0, rising to gamma at x = 1),  then gamma.

Threshold ``beta`` (default; ``mmdet_compat=False``) scales the WHOLE function,
``L_beta(x) = beta * L(x / beta)``, so the gradient is still 0 at x = 0 and continuous (= gamma) at
``x = beta``::

    L_beta(x) = alpha / b * (b*x + beta) * ln(b*x/beta + 1) - alpha*x      if x < beta
    L_beta(x) = gamma*x + gamma*beta / b - alpha*beta                        otherwise

mmdetection-compatible form (``mmdet_compat=True``, MODEL.BALANCED_L1.MMDET_COMPAT): beta only
divides ``x`` inside the logarithm::

    L_mm(x) = alpha / b * (b*x + 1) * ln(b*x/beta + 1) - alpha*x           if x < beta
    L_mm(x) = gamma*x + gamma / b - alpha*beta                               otherwise

Its value is continuous at ``beta`` but its gradient is not unless beta = 1:
``dL_mm/dx(0+) = alpha * (1/beta - 1)`` and ``dL_mm/dx(beta-) = gamma + alpha * ((b*beta + 1) /
(beta * (b + 1)) - 1)``; at beta = 0.11 these are 4.045 and 1.701, against gamma = 1.5 right of
beta. Libra RetinaNet's published numbers were trained
with this form. At beta = 1 both forms are the paper's form.
"""
import math

import torch
from torch.autograd.function import once_differentiable

from ..validation import Bool, Float, cfg_node, check_params
from .box_regression import BoxRegressionLoss, dense_box_regression_deltas
from .registry import BOX_REG_LOSS_REGISTRY

__all__ = ["balanced_l1_loss", "balanced_l1_b", "check_balanced_l1_params", "BalancedL1Loss"]


def balanced_l1_b(alpha: float, gamma: float) -> float:
    """
    The constant ``b`` of the balanced L1 loss, from ``alpha * ln(b + 1) = gamma``.

    Args:
        alpha (float): the inlier gradient scale (> 0).
        gamma (float): the outlier gradient, i.e. the slope of the linear part (> 0).

    Returns:
        float: ``exp(gamma / alpha) - 1``.
    """
    return math.expm1(gamma / alpha)


# exp(50) ~ 5e21: far beyond any useful setting, and b*x stays finite in float32 for |x| < 1e16.
_MAX_GAMMA_OVER_ALPHA = 50.0

#: Valid values of the parameters (also of the MODEL.BALANCED_L1 keys).
PARAMS = {
    "alpha": Float(low=0.0, low_open=True),
    "gamma": Float(low=0.0, low_open=True),
    "beta": Float(low=0.0, low_open=True),
    "mmdet_compat": Bool(),
}


def check_balanced_l1_params(alpha, gamma, beta, mmdet_compat=False, names=None):
    """
    Validate the parameters of :func:`balanced_l1_loss`, raising a clear error for bad ones.

    Args:
        alpha, gamma, beta, mmdet_compat: see :func:`balanced_l1_loss`; alpha, gamma and beta
            must be finite numbers > 0 with ``gamma / alpha <= 50`` (``b = exp(gamma / alpha) - 1``
            would overflow beyond), mmdet_compat a bool.
        names (dict, optional): the name to report for each argument (e.g. config keys).

    Returns:
        dict: the checked values.

    Raises:
        ValueError: naming the argument (or key), the bad value and what is valid.
    """
    names = names or {}
    values = check_params(
        PARAMS, names, alpha=alpha, gamma=gamma, beta=beta, mmdet_compat=mmdet_compat
    )
    if values["gamma"] / values["alpha"] > _MAX_GAMMA_OVER_ALPHA:
        raise ValueError(
            f"{names.get('gamma', 'gamma')} / {names.get('alpha', 'alpha')} = {gamma!r} / "
            f"{alpha!r} is invalid: it must be <= {_MAX_GAMMA_OVER_ALPHA:g}, otherwise "
            "b = exp(gamma / alpha) - 1 overflows."
        )
    return values


class _BalancedL1(torch.autograd.Function):
    """Element-wise balanced L1 of a difference ``d`` (formulas in the module docstring)."""

    @staticmethod
    def forward(ctx, d, alpha, gamma, beta, mmdet_compat):
        b = balanced_l1_b(alpha, gamma)
        # s multiplies 1/b; the paper-correct and the mmdetection forms differ only there.
        s = 1.0 if mmdet_compat else beta
        x = d.abs()
        # The logarithmic branch only matters below beta; clamping keeps it finite for huge x.
        xi = x.clamp(max=beta)
        inlier = (alpha / b) * (b * xi + s) * torch.log1p(xi * (b / beta)) - alpha * xi
        outlier = gamma * x + (gamma * s / b - alpha * beta)
        ctx.save_for_backward(d)
        ctx.params = (alpha, gamma, beta, s, b)
        return torch.where(x < beta, inlier, outlier)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (d,) = ctx.saved_tensors
        alpha, gamma, beta, s, b = ctx.params
        x = d.abs()
        xi = x.clamp(max=beta)
        # dL/dx below beta: alpha*ln(b*x/beta + 1), plus alpha*((b*x + s)/(b*x + beta) - 1),
        # which is 0 for the paper-correct form (s = beta).
        slope = torch.log1p(xi * (b / beta)).mul_(alpha)
        if s != beta:
            slope += alpha * ((b * xi + s) / (b * xi + beta) - 1.0)
        slope = torch.where(x < beta, slope, torch.full_like(slope, gamma))
        # d|d|/dd = sign(d), 0 at d = 0 (as torch.abs's gradient).
        return grad_out * slope * d.sign(), None, None, None, None


_HALF = (torch.float16, torch.bfloat16)


def _sum(loss):
    """The sum, accumulated in float32 for half-precision losses (whose sum overflows at 65504)."""
    return loss.sum(dtype=torch.float32) if loss.dtype in _HALF else loss.sum()


def balanced_l1_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    mmdet_compat: bool = False,
    reduction: str = "none",
) -> torch.Tensor:
    """
    Balanced L1 loss of Libra R-CNN, element-wise (formulas in the module docstring).

    Args:
        input (Tensor): predictions (e.g. box deltas), any shape.
        target (Tensor): targets, broadcastable to ``input``.
        alpha (float): inlier gradient scale; the gradient at ``x < beta`` is
            ``alpha * ln(b*x/beta + 1)``. Paper: 0.5.
        gamma (float): slope of the linear (outlier) part. Paper: 1.5.
        beta (float): where the loss turns linear. Paper: 1.0 (Faster R-CNN); Libra RetinaNet
            used 0.11.
        mmdet_compat (bool): False (default): ``beta * L(x / beta)``, gradient 0 at 0 and
            continuous at ``beta``. True: mmdetection's form (beta only inside the logarithm).
        reduction (str): "none" | "sum" | "mean" ("mean" of an empty input gives 0).

    Returns:
        Tensor: the loss, of the broadcast shape for "none", else a scalar.
    """
    check_balanced_l1_params(alpha, gamma, beta, mmdet_compat)
    # Autograd handles broadcasting and dtype promotion of the difference; the loss of the
    # difference has a hand-written backward (exact closed-form gradient, ~2x faster than
    # letting autograd record the ~14 element-wise ops).
    loss = _BalancedL1.apply(input - target, float(alpha), float(gamma), float(beta), mmdet_compat)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return _sum(loss)
    if reduction == "mean":
        if loss.numel() == 0:
            return loss.sum() * 0.0
        return loss.mean(dtype=torch.float32) if loss.dtype in _HALF else loss.mean()
    raise ValueError(f"reduction = {reduction!r} is invalid: expected 'none', 'sum' or 'mean'.")


@BOX_REG_LOSS_REGISTRY.register()
class BalancedL1Loss(BoxRegressionLoss):
    """
    "balanced_l1": the balanced L1 loss on the box deltas, summed (the head normalises it).
    Parameters from ``MODEL.BALANCED_L1``, shared by every head that uses this type.
    """

    name = "balanced_l1"

    def __init__(self, alpha=0.5, gamma=1.5, beta=1.0, mmdet_compat=False):
        """
        Args:
            alpha, gamma, beta, mmdet_compat: see :func:`balanced_l1_loss`.
        """
        super().__init__()
        self.params = check_balanced_l1_params(alpha, gamma, beta, mmdet_compat)

    @classmethod
    def from_config(cls, cfg, head_key):
        names = {a: f"MODEL.BALANCED_L1.{a.upper()}" for a in PARAMS}
        node = cfg_node(cfg, "MODEL.BALANCED_L1")
        return cls(**check_balanced_l1_params(**{a: node[a.upper()] for a in PARAMS}, names=names))

    def elementwise(self, pred_deltas, target_deltas):
        """The loss of every delta coordinate (same shape as the inputs)."""
        return balanced_l1_loss(pred_deltas, target_deltas, **self.params)

    def forward(self, anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask):
        pred, target = dense_box_regression_deltas(
            anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask
        )
        return _sum(self.elementwise(pred, target))

    def per_box(self, proposal_boxes, gt_boxes, pred_deltas, box2box_transform):
        target = box2box_transform.get_deltas(proposal_boxes, gt_boxes)
        return self.elementwise(pred_deltas, target).sum(dim=1)

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.params.items())
