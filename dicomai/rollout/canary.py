"""Which studies a canary version sends results for: a fixed fraction, chosen by study UID."""

from __future__ import annotations

import hashlib

# Selection in hundredths of a percent, so that 0.5 % canaries are possible.
_BUCKETS = 10_000


def canary_bucket(study_uid: str) -> int:
    """The study's bucket in [0, 10000), the same in every process and on every run."""
    return int(hashlib.sha256(study_uid.encode("ascii")).hexdigest()[:8], 16) % _BUCKETS


def canary_selects(study_uid: str, percent: float) -> bool:
    """Whether a canary at `percent` % sends its results for this study.

    Raising the percentage only adds studies: a study selected at 5 % is selected at 10 %.
    """
    return canary_bucket(study_uid) < round(percent * _BUCKETS / 100)
