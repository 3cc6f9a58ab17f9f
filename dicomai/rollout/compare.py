"""How two versions of a model agreed on the images both of them evaluated."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomai.db.models import Job, JobState, ModelVersion, Prediction


@dataclass(frozen=True)
class Agreement:
    """Positive/negative calls of the two versions on one top finding, image by image."""

    label: str
    both_positive: int
    both_negative: int
    only_first: int
    only_second: int

    @property
    def total(self) -> int:
        return self.both_positive + self.both_negative + self.only_first + self.only_second

    @property
    def rate(self) -> float:
        return (self.both_positive + self.both_negative) / self.total if self.total else 0.0


@dataclass(frozen=True)
class Comparison:
    """The agreement of `first` and `second` on their shared images."""

    first: str
    second: str
    shared_images: int
    shared_studies: int
    mean_abs_difference: float | None
    different_top_finding: int
    agreements: tuple[Agreement, ...]


@dataclass(frozen=True)
class _Call:
    study_id: int
    label: str | None
    probability: float
    positive: bool


def compare_versions(session: Session, first: ModelVersion, second: ModelVersion) -> Comparison:
    """Compare the predictions of two versions on the images both evaluated.

    Each image counts once per version, from that version's latest finished job on it.
    """
    mine, theirs = _calls(session, first.id), _calls(session, second.id)
    shared = sorted(set(mine) & set(theirs))
    table: dict[str, list[int]] = {}
    differences = []
    different = 0
    for instance_id in shared:
        a, b = mine[instance_id], theirs[instance_id]
        differences.append(abs(a.probability - b.probability))
        if a.label != b.label:
            different += 1
            continue
        cell = table.setdefault(a.label or "", [0, 0, 0, 0])
        cell[_cell(a.positive, b.positive)] += 1
    return Comparison(
        first=first.label,
        second=second.label,
        shared_images=len(shared),
        shared_studies=len({mine[i].study_id for i in shared}),
        mean_abs_difference=sum(differences) / len(differences) if differences else None,
        different_top_finding=different,
        agreements=tuple(Agreement(label, *counts) for label, counts in sorted(table.items())),
    )


def _cell(first: bool, second: bool) -> int:
    if first and second:
        return 0
    if not first and not second:
        return 1
    return 2 if first else 3


def _calls(session: Session, version_id: int) -> dict[int, _Call]:
    latest = (
        select(func.max(Job.id))
        .where(Job.model_version_id == version_id, Job.state == JobState.DONE)
        .group_by(Job.study_id)
    )
    rows = session.execute(
        select(
            Prediction.instance_id,
            Job.study_id,
            Prediction.label,
            Prediction.probability,
            Prediction.positive,
        )
        .join(Job, Prediction.job_id == Job.id)
        .where(
            Job.id.in_(latest),
            Prediction.evaluated.is_(True),
            Prediction.probability.is_not(None),
        )
    )
    return {
        instance_id: _Call(study_id, label, float(probability or 0.0), bool(positive))
        for instance_id, study_id, label, probability, positive in rows
    }
