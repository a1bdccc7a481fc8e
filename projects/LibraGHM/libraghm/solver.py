"""Whole-model gradient-norm clipping, as the GHM and Libra R-CNN papers' training recipes use.

Detectron2's ``SOLVER.CLIP_GRADIENTS`` clips each parameter tensor on its own ("value" or
"norm"); mmdetection's GHM RetinaNet clips the norm of *all* gradients together (max 35). With
GHM-R's large weights on lone samples, the whole-model clip keeps early from-scratch training stable.
"""
import torch

from .validation import Float

__all__ = ["maybe_add_full_model_gradient_clipping"]


def maybe_add_full_model_gradient_clipping(cfg, optimizer):
    """
    Make ``optimizer.step()`` first clip the global norm of all its parameters' gradients to
    ``cfg.LIBRAGHM.CLIP_GRAD_NORM`` (no-op when it is 0).

    Args:
        cfg (CfgNode): config with LibraGHM's keys.
        optimizer (torch.optim.Optimizer): as built by ``DefaultTrainer.build_optimizer``.

    Returns:
        torch.optim.Optimizer: the same optimizer (its class swapped for a clipping subclass).
    """
    max_norm = Float(low=0.0).check(cfg.LIBRAGHM.CLIP_GRAD_NORM, "LIBRAGHM.CLIP_GRAD_NORM")
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
