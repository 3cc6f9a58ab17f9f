"""Deployment states of model versions: registered → shadow → canary → active → retired.

Every change is checked against `ALLOWED`, locks the versions of that model name, and writes
an audit row with the operator, the command and the reason in the same transaction.

`rollback NAME` makes the version that was active before the current one active again and
retires the current one. Retired is final otherwise: a retired version comes back only by
rollback, so a version pulled for a fault is not switched on again by a slip of the keyboard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.audit import Action, Operator, record
from dicomai.db.models import Job, JobState, ModelState, ModelVersion, Study, utcnow
from dicomai.errors import DicomaiError, InvalidTransition
from dicomai.jobs.assembler import cancel_job, ensure_report, lock_studies
from dicomai.rollout.canary import MIN_PERCENT, reporter, sent_by
from dicomai.rollout.gate import GateDecision, decide
from dicomai.rollout.registry import get

R, S, C, A = ModelState.REGISTERED, ModelState.SHADOW, ModelState.CANARY, ModelState.ACTIVE

# target state -> the states a version may reach it from
ALLOWED: dict[ModelState, frozenset[ModelState]] = {
    ModelState.SHADOW: frozenset({R, C}),
    ModelState.CANARY: frozenset({R, S, C}),
    ModelState.ACTIVE: frozenset({R, S, C}),
    ModelState.RETIRED: frozenset({R, S, C, A}),
}


def shadow(session: Session, name: str, version: str, operator: Operator) -> ModelVersion:
    """Run `name version` on new studies beside the active version, storing and never sending."""
    row = _checked(session, name, version, ModelState.SHADOW)
    was = _describe(row)
    hand_over = _HandOver.locked(session, name)
    _set_state(session, row, ModelState.SHADOW, Action.MODEL_SHADOWED, operator)
    hand_over.run(session, operator, f"{row.label} {was} -> shadow")
    return row


def canary(
    session: Session, name: str, version: str, percent: float, operator: Operator
) -> ModelVersion:
    """Run `name version` on new studies and send its results for `percent` % of them.

    Also changes a canary's percentage. The studies whose jobs are queued or running are
    looked at again: one whose report is now due from a version that ran silent for it gets
    that version's job queued again, and none gets a second report (`sends_results`).
    """
    if not MIN_PERCENT <= percent <= 100:  # also refuses NaN
        raise DicomaiError(
            f"--percent must be in [{MIN_PERCENT:g}, 100] (studies are selected in steps of "
            f"{MIN_PERCENT:g} %), got {percent:g}"
        )
    row = _checked(session, name, version, ModelState.CANARY)
    other = _in_state(session, name, ModelState.CANARY)
    if other is not None and other.id != row.id:
        raise InvalidTransition(f"{other.label} is already the canary of {name}; retire it first")
    was = _describe(row)
    hand_over = _HandOver.locked(session, name)
    _set_state(session, row, ModelState.CANARY, Action.MODEL_CANARIED, operator, percent)
    hand_over.run(session, operator, f"{row.label} {was} -> canary {percent:g} %")
    return row


def activate(
    session: Session,
    name: str,
    version: str,
    operator: Operator,
    *,
    tolerance: float = 0.02,
    force: bool = False,
) -> ModelVersion:
    """Make `name version` the active version; the one active before it is retired.

    Raises
    ------
    InvalidTransition
        The version cannot become active from its state, or the evaluation gate refuses it
        and `force` is not given (see `dicomai.rollout.gate`).
    """
    row = _checked(session, name, version, ModelState.ACTIVE)
    current = _in_state(session, name, ModelState.ACTIVE)
    was = _describe(row)
    hand_over = _HandOver.locked(session, name, current)
    decision = decide(row, current, tolerance)
    session.info["dicomai_gate"] = decision
    if not decision.passed:
        _override(session, row, decision, operator, force)
    if current is not None:
        _set_state(session, current, ModelState.RETIRED, Action.MODEL_RETIRED, operator)
    row.previous_active_id = current.id if current is not None else None
    _set_state(session, row, ModelState.ACTIVE, Action.MODEL_ACTIVATED, operator, gate=decision)
    hand_over.run(session, operator, f"{row.label} {was} -> active")
    return row


def rollback(session: Session, name: str, operator: Operator) -> tuple[ModelVersion, ModelVersion]:
    """Make the previously active version of `name` active again; return it and the retired one."""
    _lock(session, name)
    current = _in_state(session, name, ModelState.ACTIVE)
    if current is None:
        raise InvalidTransition(f"{name} has no active version to roll back")
    previous = (
        session.get(ModelVersion, current.previous_active_id)
        if current.previous_active_id is not None
        else None
    )
    if previous is None:
        raise InvalidTransition(f"{current.label} has no earlier active version to roll back to")
    hand_over = _HandOver.locked(session, name, current)
    _set_state(session, current, ModelState.RETIRED, Action.MODEL_RETIRED, operator)
    _set_state(session, previous, ModelState.ACTIVE, Action.MODEL_ROLLED_BACK, operator)
    hand_over.run(session, operator, f"{current.label} rolled back to {previous.label}")
    return previous, current


def retire(
    session: Session, name: str, version: str, operator: Operator, force: bool = False
) -> ModelVersion:
    """Stop running `name version` on new studies, for good (except by rollback).

    The active version only with `force` and a reason: it leaves the model without a
    version until another is activated, and rollback cannot bring it back (it restores the
    version before an active one).
    """
    row = _checked(session, name, version, ModelState.RETIRED)
    was = row.state
    if was == ModelState.ACTIVE:
        if not force:
            raise InvalidTransition(
                f"{row.label} is the active version: activate another (or roll back) to "
                f"replace it; retiring it leaves {name} without a model (--force --reason "
                "'...' does)"
            )
        if not operator.reason.strip():
            raise DicomaiError("--force needs a --reason, recorded in the audit trail")
    hand_over = _HandOver.locked(session, name, row)
    _set_state(session, row, ModelState.RETIRED, Action.MODEL_RETIRED, operator)
    # A canary's studies fall back to the active version; a shadow's have it already.
    hand_over.run(session, operator, f"{row.label} retired")
    return row


def active_version(session: Session, name: str) -> ModelVersion | None:
    return _in_state(session, name, ModelState.ACTIVE)


def queued_jobs(session: Session, version: ModelVersion) -> list[Job]:
    """The jobs of `version` that no worker has started."""
    return list(
        session.scalars(
            select(Job)
            .where(Job.model_version_id == version.id, Job.state == JobState.QUEUED)
            .order_by(Job.id)
            .with_for_update()
        )
    )


@dataclass(frozen=True)
class _HandOver:
    """The studies a change of `name`'s states may give another reporting version: those
    with a job of `name` queued or running, found and locked before the transaction writes
    an audit row (see `dicomai.jobs.assembler.lock_studies`); and the queued jobs of the
    version retired by the change, to cancel.

    Which version sends is decided when a job finishes (`sends_results`). A version may
    have run silent for a study whose report the change now gives to it (a canary lowered
    or made shadow: the active version ran silent where the canary was to speak), so the
    change has to look again at every study still in flight.
    """

    name: str
    retired: ModelVersion | None
    queued: list[Job]
    studies: dict[int, Study]

    @classmethod
    def locked(cls, session: Session, name: str, retired: ModelVersion | None = None) -> _HandOver:
        queued = queued_jobs(session, retired) if retired is not None else []
        in_flight = (
            select(Job)
            .join(ModelVersion, Job.model_version_id == ModelVersion.id)
            .where(ModelVersion.name == name, Job.state.in_((JobState.QUEUED, JobState.RUNNING)))
            .order_by(Job.id)
            .with_for_update(of=Job)
        )
        studies = {job.study_id: job.study for job in session.scalars(in_flight)}
        lock_studies(session, studies)
        return cls(name, retired, queued, studies)

    def run(self, session: Session, operator: Operator, why: str) -> None:
        """Cancel the retired version's queued jobs (a version pulled for a fault must not
        send results after it), and see that each study in flight gets its reporter's
        report where no version has sent one: a job queued for the reporter, or its finished
        silent job queued again (`job.retried`, with `why`). A running job of the retired
        version stores its results without sending them, unless its SR went out before.

        `session.info["dicomai_hand_over"]` holds (jobs cancelled, {version label: studies
        queued for it}), for the CLI to say.
        """
        if self.retired is not None:
            for job in self.queued:
                cancel_job(session, job, operator.user, f"{self.retired.label} retired")
        queued: dict[str, int] = {}
        for study in self.studies.values():
            if sent_by(session, self.name, study) is not None:
                continue  # its report went out: another would be a second one
            version = reporter(session, self.name, study)
            if version is None:
                continue
            reason = f"{why}; {version.label} reports on the study"
            if ensure_report(session, study, version, operator.user, reason):
                queued[version.label] = queued.get(version.label, 0) + 1
        session.info["dicomai_hand_over"] = (len(self.queued), queued)


def _checked(session: Session, name: str, version: str, target: ModelState) -> ModelVersion:
    _lock(session, name)
    row = get(session, name, version)
    if row.state not in ALLOWED[target]:
        if row.state == target:
            raise InvalidTransition(f"{row.label} is already {target.value}")
        retired = row.state == ModelState.RETIRED
        hint = "; only rollback brings a retired version back" if retired else ""
        raise InvalidTransition(
            f"{row.label} is {row.state.value}; it cannot become {target.value}{hint}"
        )
    return row


def _lock(session: Session, name: str) -> None:
    # Two admins changing the same model at once must not leave two active versions.
    # FOR NO KEY UPDATE: a job inserted meanwhile (the assembler's, holding its study's lock)
    # takes a key-share lock on its version, which FOR UPDATE would make wait for us while
    # we wait for the study (PostgreSQL).
    if session.get_bind().dialect.name == "sqlite":
        _begin_writing(session)
    session.scalars(
        select(ModelVersion.id).where(ModelVersion.name == name).with_for_update(key_share=True)
    ).all()


def _begin_writing(session: Session) -> None:
    """Take SQLite's write lock now. SQLite ignores FOR UPDATE and pysqlite begins a
    transaction at its first write, so two activations both read the old active version
    before either wrote, and both made theirs active: two reports per study."""
    driver = session.connection().connection.driver_connection
    if not getattr(driver, "in_transaction", True):
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")


def _in_state(session: Session, name: str, state: ModelState) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.name == name, ModelVersion.state == state)
        .order_by(ModelVersion.state_changed_at.desc())
    ).first()


def _describe(row: ModelVersion) -> str:
    if row.state == ModelState.CANARY:
        return f"canary {row.canary_percent or 0:g} %"
    return row.state.value


def _override(
    session: Session, row: ModelVersion, decision: GateDecision, operator: Operator, force: bool
) -> None:
    if not force:
        raise InvalidTransition(f"{decision.message}; use --force --reason '...' to override")
    if not operator.reason.strip():
        raise DicomaiError("--force needs a --reason, recorded in the audit trail")
    record(
        session,
        Action.MODEL_GATE_OVERRIDDEN,
        actor=operator.user,
        object_type="model",
        object_id=row.label,
        gate=decision.detail(),
        **operator.detail(),
    )


def _set_state(
    session: Session,
    row: ModelVersion,
    state: ModelState,
    action: Action,
    operator: Operator,
    percent: float | None = None,
    gate: GateDecision | None = None,
) -> None:
    previous = row.state
    row.state = state
    row.canary_percent = percent if state == ModelState.CANARY else None
    row.state_changed_at = utcnow()
    extra: dict[str, Any] = {"gate": gate.detail()} if gate is not None else {}
    if percent is not None:
        extra["percent"] = percent
    record(
        session,
        action,
        actor=operator.user,
        object_type="model",
        object_id=row.label,
        previous=previous.value,
        state=state.value,
        **extra,
        **operator.detail(),
    )
