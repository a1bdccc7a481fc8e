"""Detectron2's own random sampling, as a registered sampler (the default)."""
from detectron2.modeling.sampling import subsample_labels

from .base import Sampler
from .registry import SAMPLER_REGISTRY

__all__ = ["RandomSampler"]


@SAMPLER_REGISTRY.register()
class RandomSampler(Sampler):
    """
    Uniform random sampling: calls Detectron2's :func:`subsample_labels` unchanged, so with
    the same seed a head using it samples exactly what the stock head samples.
    """

    def __call__(self, labels, num_samples, positive_fraction, bg_label, **match_quality):
        """
        Args:
            labels, num_samples, positive_fraction, bg_label: see :meth:`Sampler.__call__`.
            **match_quality: ``ious``, ``gt_index``, ``num_gt``; ignored.

        Returns:
            Tensor[int64], Tensor[int64]: sampled positive and negative indices.
        """
        return subsample_labels(labels, num_samples, positive_fraction, bg_label)

    def __repr__(self):
        return "RandomSampler()"
