"""The registry of LibraGHM's samplers (pick one by name with ``LIBRAGHM.*_SAMPLER.NAME``)."""
from fvcore.common.registry import Registry

__all__ = ["SAMPLER_REGISTRY"]

SAMPLER_REGISTRY = Registry("LIBRAGHM_SAMPLER")
SAMPLER_REGISTRY.__doc__ = """
Registry of samplers that choose which labelled candidates (ROI-head proposals or RPN anchors)
are used for training. A registered object is a :class:`libraghm.sampling.base.Sampler`
subclass with a ``from_config(node, prefix)`` classmethod; it is selected by the config key
``LIBRAGHM.ROI_SAMPLER.NAME`` (ROI heads) or ``LIBRAGHM.RPN_SAMPLER.NAME`` (RPN).
"""
