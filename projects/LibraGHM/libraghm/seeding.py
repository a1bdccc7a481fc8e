"""Seeds derived from one training seed, so that every random choice of training is reproducible."""
import random
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["derive_seed", "seed_global_rngs", "seeded_global_rngs", "ORDER", "REPEAT", "AUGMENT", "STEP"]

#: Purpose tags: streams derived from one training seed for different purposes never coincide.
ORDER, REPEAT, AUGMENT, STEP = range(4)


def derive_seed(*words: int) -> int:
    """
    Args:
        words (int): non-negative integers (a seed, a purpose tag, an iteration, ...).

    Returns:
        int: a 63-bit seed determined by ``words`` (NumPy's SeedSequence hash).
    """
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_global_rngs(seed: int, all_devices: bool = True):
    """
    Seed Python's, NumPy's and torch's global generators.

    Args:
        seed (int): a 63-bit seed.
        all_devices (bool): also torch's generators of every GPU; False: only the CPU one.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if all_devices:
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


@contextmanager
def seeded_global_rngs(seed: int):
    """
    Seed Python's, NumPy's and torch's CPU generators for the duration of the block,
    and give them back their previous states afterwards.

    Args:
        seed (int): a 63-bit seed.
    """
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    seed_global_rngs(seed, all_devices=False)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])
