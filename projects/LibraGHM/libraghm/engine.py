"""Training that never passes a diverged model off as trained.

Detectron2 stops when the *logged* loss is non-finite, but a loss can stay finite while the model
is not (e.g. a loss that drops non-finite predictions as ignored, or a NaN that reaches only some
parameters). :class:`DivergenceGuard` checks every parameter and buffer every ``period`` iterations
and after the last one, and :class:`FiniteCheckpointer` refuses to write any checkpoint (periodic or
final) of a model with a non-finite tensor; both raise ``FloatingPointError`` naming the first bad
tensor. One host synchronisation per check.

:class:`IterationSeed` makes the randomness of every training step (proposal sampling, dropout,
...) a function of the training seed and the iteration, so that a resumed run repeats the steps of
a straight one; with :mod:`libraghm.data.resumable_loader` the data stream does the same.
"""
from typing import Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from detectron2.utils import comm

from .data.resumable_loader import ResumableBatchSampler
from .seeding import STEP, derive_seed, seed_global_rngs

from .validation import Int

__all__ = ["first_nonfinite", "DivergenceGuard", "FiniteCheckpointer", "IterationSeed", "PERIOD"]

#: Valid values of LIBRAGHM.FINITE_CHECK_PERIOD.
PERIOD = Int(low=0)


def first_nonfinite(model: torch.nn.Module) -> Optional[str]:
    """
    Args:
        model (nn.Module): a model (DistributedDataParallel is unwrapped).

    Returns:
        str or None: the name of the first parameter or buffer holding a NaN or Inf, or None.
    """
    model = getattr(model, "module", model)
    named = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if t.is_floating_point() and t.numel() > 0]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def _diverged(name, what):
    return FloatingPointError(
        f"Training diverged: {name} holds NaN or Inf values; {what}. Lower the learning rate, "
        "clip gradients (SOLVER.CLIP_GRADIENTS or LIBRAGHM.CLIP_GRAD_NORM) or check the data."
    )


class FiniteCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` whose ``save`` refuses a model with non-finite tensors."""

    def save(self, name: str, **kwargs):
        bad = first_nonfinite(self.model)
        if bad is not None:
            raise _diverged(bad, f"checkpoint {name!r} was not written")
        return super().save(name, **kwargs)


class DivergenceGuard(HookBase):
    """Stops training when a parameter or buffer is non-finite (checked every ``period`` steps)."""

    def __init__(self, model: torch.nn.Module, period: int):
        """
        Args:
            model (nn.Module): the trained model.
            period (int): check every this many iterations and after the last one; 0: only the
                checkpoints are checked (by :class:`FiniteCheckpointer`).
        """
        self._model = model
        self._period = PERIOD.check(period, "period")

    def after_step(self):
        it = self.trainer.iter + 1
        if self._period and (it % self._period == 0 or it >= self.trainer.max_iter):
            bad = first_nonfinite(self._model)
            if bad is not None:
                raise _diverged(bad, f"training stopped after iteration {self.trainer.iter}")


class IterationSeed(HookBase):
    """
    Before every step, seeds Python's, NumPy's and torch's global generators (all devices) from
    ``(seed, iteration, rank)``. The seed is part of the trainer's checkpoint and restored on
    resume; an exactly resumable data stream (:class:`ResumableBatchSampler`) given to the hook
    is started with that seed at the first iteration to train.
    """

    def __init__(self, seed: int, stream: Optional[ResumableBatchSampler] = None):
        """
        Args:
            seed (int): the training seed (>= 0).
            stream (ResumableBatchSampler or None): the training loader's batch sampler.
        """
        self.seed = int(seed)
        self._stream = stream

    def before_train(self):
        if self._stream is not None:
            self._stream.seed, self._stream.start_iter = self.seed, self.trainer.start_iter

    def before_step(self):
        seed_global_rngs(derive_seed(self.seed, STEP, self.trainer.iter, comm.get_rank()))

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state_dict):
        self.seed = int(state_dict["seed"])
