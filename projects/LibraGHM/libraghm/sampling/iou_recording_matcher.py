"""A Detectron2 Matcher that also remembers each candidate's IoU, for IoU-aware samplers."""
from dataclasses import dataclass
from typing import Optional

import torch
from detectron2.modeling.matcher import Matcher

__all__ = ["MatchRecord", "IoURecordingMatcher"]


@dataclass
class MatchRecord:
    """
    What a sampler needs from the last matching.

    Attributes:
        ious (Tensor[float]): (N,) each candidate's largest IoU with any ground truth (0 when
            the image has no ground truth).
        matches (Tensor[int64]): (N,) the matched ground-truth index (Matcher's ``matches``).
        num_gt (int): number of ground-truth boxes.
    """

    ious: torch.Tensor
    matches: torch.Tensor
    num_gt: int


class IoURecordingMatcher(Matcher):
    """
    Detectron2's :class:`Matcher`, unchanged, that also stores the match quality of its last
    call in :attr:`last_match`. The heads match and then sample one image at a time, so right
    after ``matcher(match_quality_matrix)`` the record belongs to the image being sampled.

    Extends ``Matcher.__call__`` (the stock result is returned unchanged).
    """

    last_match: Optional[MatchRecord] = None

    @classmethod
    def from_matcher(cls, matcher: Matcher) -> "IoURecordingMatcher":
        """
        Args:
            matcher (Matcher): a configured Detectron2 matcher.

        Returns:
            IoURecordingMatcher: a recording matcher with the same thresholds, labels and
            low-quality-match setting.
        """
        return cls(
            list(matcher.thresholds[1:-1]),  # Matcher stores them with -inf / inf added
            list(matcher.labels),
            allow_low_quality_matches=matcher.allow_low_quality_matches,
        )

    @classmethod
    def for_sampler(cls, matcher: Matcher, sampler) -> Matcher:
        """
        The matcher a head should use with ``sampler``.

        Args:
            matcher (Matcher): the head's configured matcher.
            sampler (Sampler): the head's sampler.

        Returns:
            Matcher: ``matcher`` itself when the sampler does not need match quality or the
            matcher already records it, else a recording copy (:meth:`from_matcher`).
        """
        if not sampler.needs_match_quality or isinstance(matcher, cls):
            return matcher
        return cls.from_matcher(matcher)

    def checked_last_match(self, num_candidates: int, kind: str) -> MatchRecord:
        """
        The record of the last call, checked to belong to the candidates being sampled.

        Args:
            num_candidates (int): number of candidates the caller is sampling from.
            kind (str): what the candidates are ("anchor", "proposal"), for the error message.

        Returns:
            MatchRecord: :attr:`last_match`.
        """
        record = self.last_match
        assert record is not None and record.ious.shape[0] == num_candidates, (
            f"the {kind} matcher's record does not belong to these {kind}s"
        )
        return record

    def __call__(self, match_quality_matrix: torch.Tensor):
        """
        Args:
            match_quality_matrix (Tensor): (M, N) pairwise IoU of M ground truths and N
                candidates.

        Returns:
            Tensor[int64], Tensor[int8]: Matcher's ``matches`` and ``match_labels``.
        """
        matches, match_labels = super().__call__(match_quality_matrix)
        num_gt, num_candidates = match_quality_matrix.shape
        if num_gt == 0:
            ious = match_quality_matrix.new_zeros(num_candidates)
        else:
            ious = match_quality_matrix.amax(dim=0)
        self.last_match = MatchRecord(ious=ious, matches=matches, num_gt=num_gt)
        return matches, match_labels
