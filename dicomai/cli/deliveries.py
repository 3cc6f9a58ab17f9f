"""`dicomai deliveries`: results on their way to destinations; retrying the failed ones."""

from __future__ import annotations

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.audit import Action, record
from dicomai.cli.main import Context
from dicomai.cli.session import admin_session, operator
from dicomai.cli.tables import print_json, print_table, when
from dicomai.db.models import Delivery, DeliveryState, Job, OutputObject, Study, utcnow
from dicomai.errors import InvalidTransition, NotFound

_STATES = click.Choice([s.value for s in DeliveryState])


@click.group()
def deliveries() -> None:
    """Deliveries: one per output object and destination."""


@deliveries.command("list")
@click.option("--state", type=_STATES, default=None, help="Only deliveries in this state.")
@click.option("--study", default=None, help="Only deliveries of this Study Instance UID.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def deliveries_list(
    obj: Context, state: str | None, study: str | None, limit: int, as_json: bool
) -> None:
    """List recent deliveries, newest first."""
    with admin_session(obj) as session:
        query = (
            select(Delivery, OutputObject, Study.study_uid)
            .join(OutputObject, Delivery.output_id == OutputObject.id)
            .join(Job, OutputObject.job_id == Job.id)
            .join(Study, Job.study_id == Study.id)
            .order_by(Delivery.id.desc())
            .limit(limit)
        )
        if state:
            query = query.where(Delivery.state == DeliveryState(state))
        if study:
            query = query.where(Study.study_uid == study)
        rows = [
            {
                "id": d.id,
                "state": d.state.value,
                "destination": d.destination,
                "kind": o.kind,
                "job_id": o.job_id,
                "study_uid": uid,
                "attempts": d.attempts,
                "delivered": when(d.delivered_at),
                "error": d.last_error or "",
            }
            for d, o, uid in session.execute(query)
        ]
    if as_json:
        for row in rows:
            print_json(row)
        return
    print_table(
        ["ID", "STATE", "DESTINATION", "KIND", "JOB", "STUDY", "ATTEMPTS", "DELIVERED", "ERROR"],
        [list(r.values()) for r in rows],
    )


@deliveries.command("retry")
@click.argument("delivery_id", type=int)
@click.option("--reason", default="", help="Why; recorded in the audit trail.")
@click.pass_obj
def deliveries_retry(obj: Context, delivery_id: int, reason: str) -> None:
    """Send a failed delivery again (the running daemon picks it up), attempts counted anew."""
    with admin_session(obj) as session:
        delivery = _get(session, delivery_id)
        if delivery.state != DeliveryState.FAILED:
            raise InvalidTransition(
                f"delivery {delivery_id} is {delivery.state.value}; only failed ones are retried"
            )
        delivery.state = DeliveryState.PENDING
        delivery.attempts = 0
        delivery.next_attempt_at = utcnow()
        delivery.rung_at = None
        who = operator(reason)
        record(
            session,
            Action.DELIVERY_RETRIED,
            actor=who.user,
            object_type="delivery",
            object_id=delivery.id,
            study_uid=delivery.output.job.study.study_uid,
            destination=delivery.destination,
            **who.detail(),
        )
    click.echo(f"delivery {delivery_id} pending again")


def _get(session: Session, delivery_id: int) -> Delivery:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise NotFound(f"delivery {delivery_id} does not exist")
    return delivery


def register(group: click.Group) -> None:
    group.add_command(deliveries)
