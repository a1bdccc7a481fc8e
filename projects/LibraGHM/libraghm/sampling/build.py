"""Build a sampler from ``cfg.LIBRAGHM.ROI_SAMPLER`` or ``cfg.LIBRAGHM.RPN_SAMPLER``."""
from .registry import SAMPLER_REGISTRY

__all__ = ["build_sampler", "SAMPLER_KEYS"]

SAMPLER_KEYS = ("ROI_SAMPLER", "RPN_SAMPLER")


def build_sampler(cfg, key: str):
    """
    Build the sampler configured under ``cfg.LIBRAGHM.<key>``, validating its values.

    Args:
        cfg (CfgNode): a config with LibraGHM's keys (``add_libraghm_config``).
        key (str): "ROI_SAMPLER" (ROI heads) or "RPN_SAMPLER" (RPN anchors).

    Returns:
        Sampler: the sampler.

    Raises:
        ValueError: unknown sampler name or invalid parameter, naming the config key, the value
            and what is valid.
    """
    if key not in SAMPLER_KEYS:
        raise ValueError(f"key={key!r}: expected one of {SAMPLER_KEYS}")
    node = cfg.LIBRAGHM[key]
    prefix = f"LIBRAGHM.{key}"
    name = node.NAME
    if name not in SAMPLER_REGISTRY:
        valid = sorted(registered for registered, _ in SAMPLER_REGISTRY)
        raise ValueError(f"{prefix}.NAME={name!r} is not a registered sampler; valid: {valid}")
    return SAMPLER_REGISTRY.get(name).from_config(node, prefix)
