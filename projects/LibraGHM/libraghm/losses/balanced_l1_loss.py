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

mmdetection-compatible form (``mmdet_compat=True``, LIBRAGHM.BALANCED_L1.MMDET_COMPAT): beta only
divides ``x`` inside the logarithm::

    L_mm(x) = alpha / b * (b*x + 1) * ln(b*x/beta + 1) - alpha*x           if x < beta
    L_mm(x) = gamma*x + gamma / b - alpha*beta                               otherwise

Its value is continuous at ``beta`` but its gradient is not unless beta = 1:
``dL_mm/dx(0+) = alpha * (1/beta - 1)`` and ``dL_mm/dx(beta-) = gamma + alpha * ((b*beta + 1) /
(beta * (b + 1)) - 1)``; at beta = 0.11 these are 4.045 and 1.701, against gamma = 1.5 right of
beta (the numbers RESEARCH.md section 3 quotes). Libra RetinaNet's published numbers were trained
with this form. At beta = 1 both forms are the paper's form.
"""
import math

import torch
from torch.autograd.function import once_differentiable

__all__ = ["balanced_l1_loss", "balanced_l1_b", "check_balanced_l1_params"]


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


def check_balanced_l1_params(alpha, gamma, beta, mmdet_compat=False, key_prefix=""):
    """
    Validate the parameters of :func:`balanced_l1_loss`, raising a clear error for bad ones.

    Args:
        alpha, gamma, beta: see :func:`balanced_l1_loss`; each must be a finite number > 0, and
            ``gamma / alpha`` must not exceed 50 (``b = exp(gamma / alpha) - 1`` would overflow).
        mmdet_compat: must be a bool.
        key_prefix (str): prefix used to name the values in error messages, e.g.
            ``"LIBRAGHM.BALANCED_L1."`` to name config keys.

    Returns:
        None

    Raises:
        ValueError: naming the key, the bad value and what is valid.
    """
    for name, value in (("ALPHA", alpha), ("GAMMA", gamma), ("BETA", beta)):
        key = f"{key_prefix}{name}" if key_prefix else name.lower()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} = {value!r} is invalid: expected a number > 0.")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key} = {value!r} is invalid: it must be a finite number > 0.")
    if gamma / alpha > _MAX_GAMMA_OVER_ALPHA:
        a_key = f"{key_prefix}ALPHA" if key_prefix else "alpha"
        g_key = f"{key_prefix}GAMMA" if key_prefix else "gamma"
        raise ValueError(
            f"{g_key} / {a_key} = {gamma!r} / {alpha!r} is invalid: it must be <= "
            f"{_MAX_GAMMA_OVER_ALPHA:g}, otherwise b = exp(gamma / alpha) - 1 overflows."
        )
    if not isinstance(mmdet_compat, bool):
        key = f"{key_prefix}MMDET_COMPAT" if key_prefix else "mmdet_compat"
        raise ValueError(f"{key} = {mmdet_compat!r} is invalid: expected True or False.")


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
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else loss.sum() * 0.0
    raise ValueError(f"reduction = {reduction!r} is invalid: expected 'none', 'sum' or 'mean'.")
