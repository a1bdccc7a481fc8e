"""LibraGHM sampling: which labelled candidates train the RPN and the ROI heads."""
# <imports>
from .registry import SAMPLER_REGISTRY, build_sampler
from .base import Sampler, split_candidates
from .grouped_ranking import rank_within_groups, water_filling_keys
from .random_sampler import RandomSampler
from .instance_balanced_sampler import (
    InstanceBalancedSampler,
    sample_instance_balanced,
    sample_uniform,
)
from .iou_balanced_sampler import IoUBalancedSampler
from .no_sampling import NoSampling
from .ohem_sampler import OHEMSampler, ohem_select_mmdet, ohem_select_paper
from .iou_recording_matcher import IoURecordingMatcher, MatchRecord
# </imports>
