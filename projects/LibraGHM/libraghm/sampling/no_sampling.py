"""No sampling: every labelled candidate trains the head."""
import torch

from .base import Sampler
from .registry import SAMPLER_REGISTRY

__all__ = ["NoSampling"]


@SAMPLER_REGISTRY.register()
class NoSampling(Sampler):
    """
    Keeps every candidate that is not ignored (label -1): all valid anchors in the RPN (what GHM-C
    objectness is meant for: it down-weights the easy negatives itself), all labelled proposals in
    the ROI heads. BATCH_SIZE_PER_IMAGE and POSITIVE_FRACTION are not used for the choice (the
    RPN's losses are still normalised by BATCH_SIZE_PER_IMAGE x images, as Detectron2's).
    """

    def __call__(self, labels, num_samples, positive_fraction, bg_label, **match_quality):
        """
        Returns:
            Tensor[int64], Tensor[int64]: all positive and all negative indices.
        """
        positive = torch.nonzero((labels != -1) & (labels != bg_label)).squeeze(1)
        negative = torch.nonzero(labels == bg_label).squeeze(1)
        return positive, negative

    def sample_proposals(self, labels, num_samples, positive_fraction, bg_label, **match_quality):
        """All labelled candidates, in their own order."""
        return torch.nonzero(labels >= 0).squeeze(1)

    def __repr__(self):
        return "NoSampling()"
