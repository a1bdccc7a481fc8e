"""The exactly resumable training stream: order, grouping, repeat factors, seeded augmentations."""
import itertools
import random

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg

from libraghm import add_libraghm_config
from libraghm.data.resumable_loader import (
    ResumableBatchSampler,
    SeededMapDataset,
    build_resumable_train_loader,
)
from libraghm.seeding import derive_seed, seeded_global_rngs


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_resuming_continues_the_same_stream():
    sampler = ResumableBatchSampler(11, 3, seed=5, groups=[i % 3 == 0 for i in range(11)])
    straight = _take(sampler, 40)
    sampler.start_iter = 17
    assert _take(sampler, 23) == straight[17:]
    assert [b[0][1] for b in straight] == list(range(40))  # the iteration is part of every key
    assert all([k[3] for k in b] == [0, 1, 2] for b in straight)  # and the slot
    sampler.seed = 6
    sampler.start_iter = 0
    assert _take(sampler, 40) != straight


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_epoch_is_a_permutation_split_across_processes(world_size):
    n, bs = 10, 2
    per_rank = [ResumableBatchSampler(n, bs, seed=3, rank=r, world_size=world_size)
                for r in range(world_size)]
    # position p of the global stream goes to rank p % world_size
    streams = [[k[4] for b in _take(s, 3 * n) for k in b] for s in per_rank]
    merged = [streams[p % world_size][p // world_size] for p in range(3 * n)]
    for epoch in range(3):
        assert sorted(merged[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert merged[:n] != merged[n:2 * n]  # reshuffled every epoch


def test_aspect_ratio_groups_are_never_mixed():
    groups = [int(i % 4 == 0) for i in range(40)]
    batches = _take(ResumableBatchSampler(40, 4, seed=1, groups=groups), 50)
    for b in batches:
        assert len({groups[k[4]] for k in b}) == 1
    assert {groups[b[0][4]] for b in batches} == {0, 1}


def test_repeat_factors_follow_stochastic_rounding():
    factors = torch.tensor([1.0, 2.0, 1.5, 0.25])
    sampler = ResumableBatchSampler(4, 1, seed=0, repeat_factors=factors)
    counts = np.zeros(4)
    epochs = 400
    for e in range(epochs):
        counts += np.bincount(sampler._epoch(e), minlength=4)
    expected = factors.numpy() * epochs
    assert counts[0] == expected[0] and counts[1] == expected[1]  # integer factors are exact
    # binomial noise of the fractional part: 4 standard deviations
    for j in (2, 3):
        frac = factors[j].item() % 1
        assert abs(counts[j] - expected[j]) < 4 * np.sqrt(epochs * frac * (1 - frac))


def _random_mapper(d):
    return {"index": d["index"], "py": random.random(), "np": float(np.random.rand()),
            "torch": float(torch.rand(()))}


def test_augmentations_depend_on_the_key_only_and_leave_global_rngs_alone():
    data = SeededMapDataset([{"index": i} for i in range(5)], _random_mapper)
    key = (9, 12, 0, 1, 3)
    torch.manual_seed(0)
    state = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = data[key]
    assert torch.equal(torch.random.get_rng_state(), state[0])
    assert np.array_equal(np.random.get_state()[1], state[1]) and random.getstate() == state[2]
    data[(9, 12, 0, 2, 3)]
    assert data[key] == first and first["index"] == 3
    others = [data[(9, 12, 0, s, 3)] for s in range(4)] + [data[(9, i, 0, 1, 3)] for i in range(4)]
    assert len({o["np"] for o in others}) == len(others)  # another slot or iteration: other draws


def test_skipped_images_are_replaced_deterministically():
    def mapper(d):
        return None if d["index"] % 2 else d
    data = SeededMapDataset([{"index": i} for i in range(6)], mapper)
    got = [data[(1, 0, 0, s, 1)]["index"] for s in range(8)]
    assert all(i % 2 == 0 for i in got)
    assert got == [data[(1, 0, 0, s, 1)]["index"] for s in range(8)]
    with pytest.raises(RuntimeError, match="returned None for 100 images"):
        SeededMapDataset([{"index": 1}], mapper)[(1, 0, 0, 0, 0)]


def test_derived_seeds_differ_per_word_and_restore():
    seeds = {derive_seed(1, tag, it) for tag in range(4) for it in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    with seeded_global_rngs(derive_seed(1)):
        a = torch.rand(3)
    with seeded_global_rngs(derive_seed(1)):
        assert torch.equal(torch.rand(3), a)


def _cfg(*opts):
    cfg = get_cfg()
    add_libraghm_config(cfg)
    cfg.merge_from_list(["DATASETS.TRAIN", "('shapes_train_mini',)", "SOLVER.IMS_PER_BATCH", 2,
                         "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 96, "SEED", 4,
                         "DATALOADER.NUM_WORKERS", 0, *opts])
    return cfg


def test_loader_gives_identical_batches_with_any_number_of_workers():
    def first(workers):
        loader = build_resumable_train_loader(_cfg("DATALOADER.NUM_WORKERS", workers,
                                                   "INPUT.RANDOM_FLIP", "horizontal"))
        loader.batch_sampler.start_iter = 2
        return [b for _, b in zip(range(3), loader)]
    zero, two = first(0), first(2)
    assert len(zero) == len(two) == 3 and all(len(b) == 2 for b in zero)
    for a, b in zip(zero, two):
        assert [x["image_id"] for x in a] == [x["image_id"] for x in b]
        for x, y in zip(a, b):
            assert torch.equal(x["image"], y["image"])
            assert torch.equal(x["instances"].gt_boxes.tensor, y["instances"].gt_boxes.tensor)
    # the flips are real: without them the same keys give the same images, some unflipped
    loader = build_resumable_train_loader(_cfg("INPUT.RANDOM_FLIP", "none"))
    loader.batch_sampler.start_iter = 2
    plain = [b for _, b in zip(range(3), loader)]
    assert [x["image_id"] for b in plain for x in b] == [x["image_id"] for b in zero for x in b]
    assert any(not torch.equal(x["image"], y["image"]) for a, b in zip(zero, plain) for x, y in zip(a, b))


def test_unsupported_sampler_and_batch_fail_clearly():
    with pytest.raises(ValueError, match=r"SAMPLER_TRAIN = 'RandomSubsetTrainingSampler'.*EXACT_RESUME"):
        build_resumable_train_loader(_cfg("DATALOADER.SAMPLER_TRAIN", "RandomSubsetTrainingSampler"))
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH\) = 0 must be a positive multiple"):
        build_resumable_train_loader(_cfg("SOLVER.IMS_PER_BATCH", 0))
