"""
A training data stream that resumes exactly.

Detectron2's training loader draws its shuffling seed once and its augmentations from each worker's
global random state, so a run resumed from a checkpoint sees other images, in another order, with
other flips than the run it continues. Here every random choice of the stream is a function of the
training seed and the iteration:

- the order: epoch ``e`` is a permutation drawn from ``(seed, e)``; process ``r`` of ``w`` takes
  positions ``r, r + w, ...`` of the concatenated epochs; batches are formed in the main process
  (grouped by aspect ratio from the dataset dicts' ``width``/``height`` if asked, as Detectron2 does),
  so the batch of iteration ``i`` is fixed by the seed alone;
- the augmentations: the mapper of the image in slot ``s`` of iteration ``i`` on process ``r`` runs
  with Python's, NumPy's and torch's global generators seeded from ``(seed, i, r, s)`` (and restored
  afterwards), whichever worker maps it.

Resuming at iteration ``i`` replays the index arithmetic up to ``i`` (no image is read) and goes on
from there: ``N`` iterations and a resume to ``2N`` give the batches of ``2N`` straight.
"""
import itertools
import logging
import random
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detectron2.data import DatasetFromList, DatasetMapper, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm

from ..seeding import AUGMENT, ORDER, REPEAT, derive_seed, seeded_global_rngs

__all__ = ["ResumableBatchSampler", "SeededMapDataset", "build_resumable_loader",
           "build_resumable_train_loader", "RESUMABLE_SAMPLERS"]

#: Values of DATALOADER.SAMPLER_TRAIN the resumable stream implements.
RESUMABLE_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler")

class ResumableBatchSampler(Sampler):
    """
    Infinite batches of keys ``(seed, iteration, rank, slot, index)``, a function of the seed.

    Set :attr:`seed` and :attr:`start_iter` before iterating (the trainer does it when it resumes);
    each ``iter()`` starts at batch ``start_iter``.
    """

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        *,
        seed: int,
        groups: Optional[Sequence[int]] = None,
        repeat_factors: Optional[torch.Tensor] = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        """
        Args:
            num_images (int): dataset length (> 0).
            batch_size (int): images per batch of this process.
            seed (int): training seed (>= 0).
            groups (list[int] or None): a group id per image (e.g. 0 for wide, 1 for tall images);
                every batch then holds images of one group. None: no grouping.
            repeat_factors (Tensor or None): per-image repeat factor (Detectron2's
                ``RepeatFactorTrainingSampler``): every epoch image ``j`` appears
                ``floor(r_j)`` times plus once more with probability ``r_j - floor(r_j)``.
            rank (int): this process's rank; world_size (int): number of processes.
        """
        if num_images <= 0:
            raise ValueError("The training set is empty (0 images); nothing to train on.")
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.start_iter = 0
        self.groups = None if groups is None else list(groups)
        self.repeat_factors = repeat_factors
        self.rank, self.world_size = rank, world_size

    def _epoch(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, ORDER, epoch))
        if self.repeat_factors is None:
            return torch.randperm(self.num_images, generator=g).tolist()
        r = torch.Generator().manual_seed(derive_seed(self.seed, REPEAT, epoch))
        whole = torch.trunc(self.repeat_factors)
        extra = torch.rand(len(whole), generator=r) < self.repeat_factors - whole
        indices = torch.repeat_interleave(torch.arange(len(whole)), (whole + extra).long())
        return indices[torch.randperm(len(indices), generator=g)].tolist()

    def _batches(self):
        stream = itertools.chain.from_iterable(self._epoch(e) for e in itertools.count())
        mine = itertools.islice(stream, self.rank, None, self.world_size)
        if self.groups is None:
            while True:
                yield list(itertools.islice(mine, self.batch_size))
        buckets = {}
        for index in mine:
            bucket = buckets.setdefault(self.groups[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket
                buckets[self.groups[index]] = []

    def __iter__(self):
        batches = itertools.islice(self._batches(), self.start_iter, None)
        for it, batch in enumerate(batches, start=self.start_iter):
            yield [(self.seed, it, self.rank, slot, index) for slot, index in enumerate(batch)]


class SeededMapDataset(Dataset):
    """Maps a key ``(seed, iteration, rank, slot, index)`` to the mapped image ``index``."""

    def __init__(self, dataset_dicts: list, mapper: Callable, max_retries: int = 100):
        """
        Args:
            dataset_dicts (list[dict]): Detectron2 dataset dicts.
            mapper (callable): dataset dict -> model input (e.g. ``DatasetMapper``); may return
                None to skip an image, which is then replaced by one drawn from the same seed.
            max_retries (int): give up (RuntimeError) after this many skipped images in a row.
        """
        self._dicts = DatasetFromList(dataset_dicts, copy=True, serialize=True)
        self._mapper = mapper
        self._max_retries = max_retries

    def __len__(self):
        return len(self._dicts)

    def __getitem__(self, key):
        seed, it, rank, slot, index = key
        with seeded_global_rngs(derive_seed(seed, AUGMENT, it, rank, slot)):
            for _ in range(self._max_retries):
                out = self._mapper(self._dicts[index])
                if out is not None:
                    return out
                logging.getLogger(__name__).warning(
                    f"The mapper skipped image {index} (iteration {it}); drawing another one.")
                index = random.randrange(len(self._dicts))
        raise RuntimeError(f"The data mapper returned None for {self._max_retries} images in a row "
                           f"(iteration {it}); check the dataset and the mapper.")


def build_resumable_loader(
    dataset: list,
    *,
    mapper: Callable,
    total_batch_size: int,
    seed: Optional[int] = None,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    repeat_factors: Optional[torch.Tensor] = None,
) -> DataLoader:
    """
    An exactly resumable training loader (plain arguments, e.g. for LazyConfig files).

    Args:
        dataset (list[dict]): Detectron2 dataset dicts (``get_detection_dataset_dicts``).
        mapper (callable): dataset dict -> model input (e.g. ``DatasetMapper(cfg, True)``).
        total_batch_size (int): images per step over all processes.
        seed (int or None): the stream's seed; None or < 0: a random seed shared by all processes.
        aspect_ratio_grouping (bool): batches of only wide or only tall images.
        num_workers (int): data-loader worker processes.
        repeat_factors (Tensor or None): per-image repeat factors (see :class:`ResumableBatchSampler`).

    Returns:
        DataLoader: yields lists of mapped images; its ``batch_sampler`` is a
        :class:`ResumableBatchSampler` (set its ``seed``/``start_iter`` before iterating;
        :class:`libraghm.engine.IterationSeed` does it when training starts).
    """
    world = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world:
        raise ValueError(f"The total batch size (SOLVER.IMS_PER_BATCH) = {total_batch_size} must be a "
                         f"positive multiple of the number of processes ({world}).")
    groups = [int(d["width"] < d["height"]) for d in dataset] if aspect_ratio_grouping else None
    if seed is None or seed < 0:
        seed = comm.shared_random_seed()
    sampler = ResumableBatchSampler(
        len(dataset), total_batch_size // world, seed=seed, groups=groups,
        repeat_factors=repeat_factors, rank=comm.get_rank(), world_size=world,
    )
    return DataLoader(
        SeededMapDataset(dataset, mapper),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        # the workers' base seed comes from this generator, not from torch's global one
        generator=torch.Generator().manual_seed(derive_seed(seed, ORDER, 2**31)),
    )


def build_resumable_train_loader(cfg, mapper: Optional[Callable] = None, *, seed: Optional[int] = None):
    """
    Detectron2's training loader with an exactly resumable stream (same datasets, filters,
    mapper, ``SOLVER.IMS_PER_BATCH``, ``DATALOADER.ASPECT_RATIO_GROUPING`` / ``NUM_WORKERS`` /
    ``SAMPLER_TRAIN`` / ``REPEAT_THRESHOLD`` / ``REPEAT_SQRT``).

    Args:
        cfg (CfgNode): the training config.
        mapper (callable or None): default ``DatasetMapper(cfg, is_train=True)``.
        seed (int or None): the stream's seed; None: ``cfg.SEED`` if >= 0, else a random seed
            shared by all processes.

    Returns:
        DataLoader: see :func:`build_resumable_loader`.
    """
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name not in RESUMABLE_SAMPLERS:
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN = {name!r} has no exactly resumable version; valid with "
            f"LIBRAGHM.EXACT_RESUME True: {', '.join(RESUMABLE_SAMPLERS)}. Set LIBRAGHM.EXACT_RESUME "
            "False to use Detectron2's loader (a resumed run then sees other data than a straight one)."
        )
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    repeat = None
    if name == "RepeatFactorTrainingSampler":
        repeat = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT)
    return build_resumable_loader(
        dicts, mapper=mapper if mapper is not None else DatasetMapper(cfg, True),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH, seed=cfg.SEED if seed is None else seed,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS, repeat_factors=repeat,
    )
