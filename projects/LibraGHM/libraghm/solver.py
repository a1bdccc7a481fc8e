"""Whole-model gradient-norm clipping, as the GHM and Libra R-CNN papers' training recipes use.

Detectron2's ``SOLVER.CLIP_GRADIENTS`` clips each parameter tensor on its own ("value" or
"norm"); mmdetection's GHM RetinaNet clips the norm of *all* gradients together (max 35). With
GHM-R's large weights on lone samples, the whole-model clip keeps early from-scratch training stable.
"""
import torch

from .validation import Float, config_keys

__all__ = ["add_full_model_gradient_clipping", "maybe_add_full_model_gradient_clipping"]


def add_full_model_gradient_clipping(optimizer, max_norm: float):
    """
    Make ``optimizer.step()`` first clip the global norm of all its parameters' gradients.

    Args:
        optimizer (torch.optim.Optimizer): any optimizer.
        max_norm (float): the largest global gradient norm, >= 0; 0 leaves the optimizer as it is.

    Returns:
        torch.optim.Optimizer: the same optimizer (its class swapped for a clipping subclass).
    """
    max_norm = Float(low=0.0).check(max_norm, "max_norm")
    if max_norm == 0:
        return optimizer

    base = type(optimizer)

    class FullModelGradientClipping(base):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure)

    FullModelGradientClipping.__name__ = base.__name__ + "WithFullModelGradientClip"
    optimizer.__class__ = FullModelGradientClipping
    return optimizer


def maybe_add_full_model_gradient_clipping(cfg, optimizer):
    """
    :func:`add_full_model_gradient_clipping` with ``cfg.LIBRAGHM.CLIP_GRAD_NORM`` (0: off).

    Args:
        cfg (CfgNode): config with LibraGHM's keys.
        optimizer (torch.optim.Optimizer): as built by ``DefaultTrainer.build_optimizer``.

    Returns:
        torch.optim.Optimizer: the same optimizer.
    """
    with config_keys("LIBRAGHM", {"max_norm": "LIBRAGHM.CLIP_GRAD_NORM"}):
        return add_full_model_gradient_clipping(optimizer, cfg.LIBRAGHM.CLIP_GRAD_NORM)
