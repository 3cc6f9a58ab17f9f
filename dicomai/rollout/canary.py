"""Which studies a canary version sends results for: a fixed fraction, chosen by study UID."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.db.models import ModelState, ModelVersion

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


def sends_results(session: Session, version: ModelVersion, study_uid: str) -> bool:
    """Whether `version`'s results for this study go to the destinations.

    A shadow never sends, nor does a retired version. A canary sends for the studies it
    selects, and for those the active version of the same model stays silent (its results
    are stored, as a shadow's are), so that a radiologist gets one report per model and
    study, not two that may disagree.
    """
    if version.state not in (ModelState.ACTIVE, ModelState.CANARY):
        return False  # a shadow; or a version retired while its job ran
    if version.state == ModelState.CANARY:
        return canary_selects(study_uid, version.canary_percent or 0.0)
    canary = session.scalars(
        select(ModelVersion).where(
            ModelVersion.name == version.name, ModelVersion.state == ModelState.CANARY
        )
    ).first()
    return canary is None or not canary_selects(study_uid, canary.canary_percent or 0.0)
