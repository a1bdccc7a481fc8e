"""The registry of LibraGHM's samplers (pick one by name with ``MODEL.ROI_HEADS.SAMPLER`` or
``MODEL.RPN.SAMPLER``)."""
from fvcore.common.registry import Registry

from ..validation import cfg_node

__all__ = ["SAMPLER_REGISTRY", "build_sampler"]

SAMPLER_REGISTRY = Registry("LIBRAGHM_SAMPLER")
SAMPLER_REGISTRY.__doc__ = """
Registry of samplers that choose which labelled candidates (ROI-head proposals or RPN anchors)
train a head. A registered object is a :class:`libraghm.sampling.base.Sampler` subclass, built by
its ``from_config(cfg, head_key)``; register your own with ``@SAMPLER_REGISTRY.register()``.
"""


def build_sampler(cfg, head_key: str):
    """
    Build the sampler named by ``<head_key>.SAMPLER``, validating its parameters.

    Args:
        cfg (CfgNode): a config with LibraGHM's keys.
        head_key (str): "MODEL.ROI_HEADS" or "MODEL.RPN".

    Returns:
        Sampler: the sampler.
    """
    name = cfg_node(cfg, f"{head_key}.SAMPLER")
    valid = sorted(n for n, _ in SAMPLER_REGISTRY)
    if not isinstance(name, str) or name not in SAMPLER_REGISTRY:
        raise ValueError(f"{head_key}.SAMPLER = {name!r} is invalid: expected one of {valid}.")
    cls = SAMPLER_REGISTRY.get(name)
    if cls.mines_hard_examples and head_key != "MODEL.ROI_HEADS":
        raise ValueError(
            f"{head_key}.SAMPLER = {name!r} is invalid: it mines hard examples with the ROI box "
            "head and works in MODEL.ROI_HEADS only."
        )
    return cls.from_config(cfg, head_key)
