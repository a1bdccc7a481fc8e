"""LibraGHM sampling."""
# <imports>
from .registry import SAMPLER_REGISTRY
from .base import Sampler, split_candidates
from .grouped_ranking import rank_within_groups, water_filling_keys
from .random_sampler import RandomSampler
from .instance_balanced_sampler import (
    InstanceBalancedSampler,
    sample_instance_balanced,
    sample_uniform,
)
from .iou_balanced_sampler import IoUBalancedSampler
from .iou_recording_matcher import IoURecordingMatcher, MatchRecord
from .build import build_sampler
# </imports>
