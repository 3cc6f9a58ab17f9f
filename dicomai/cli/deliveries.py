"""`dicomai deliveries`: results on their way to destinations; retrying the failed ones."""

from __future__ import annotations

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.audit import Action, Operator, record
from dicomai.cli.main import Context
from dicomai.cli.params import LIMIT, ROW_ID
from dicomai.cli.session import admin_session, operator
from dicomai.cli.tables import print_rows, when
from dicomai.db.clock import database_now
from dicomai.db.models import Delivery, DeliveryState, Job, OutputObject, Study
from dicomai.errors import InvalidTransition, NotFound

_STATES = click.Choice([s.value for s in DeliveryState])


@click.group()
def deliveries() -> None:
    """Deliveries: one per output object and destination."""


@deliveries.command("list")
@click.option("--state", type=_STATES, default=None, help="Only deliveries in this state.")
@click.option("--study", default=None, help="Only deliveries of this Study Instance UID.")
@click.option("--limit", default=50, show_default=True, type=LIMIT)
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
                "next_attempt": when(d.next_attempt_at) if d.state == DeliveryState.PENDING else "",
                "delivered": when(d.delivered_at),
                "error": d.last_error or "",
            }
            for d, o, uid in session.execute(query)
        ]
    print_rows(
        [
            "ID",
            "STATE",
            "DESTINATION",
            "KIND",
            "JOB",
            "STUDY",
            "ATTEMPTS",
            "NEXT",
            "DELIVERED",
            "ERROR",
        ],
        rows,
        as_json,
    )


@deliveries.command("retry")
@click.argument("delivery_ids", metavar="[ID]...", nargs=-1, type=ROW_ID)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed delivery.")
@click.option("--study", default=None, help="With --failed: only this Study Instance UID's.")
@click.option("--destination", default=None, help="With --failed: only to this destination.")
@click.option("--reason", default="", help="Why; recorded in the audit trail.")
@click.pass_obj
def deliveries_retry(
    obj: Context,
    delivery_ids: tuple[int, ...],
    all_failed: bool,
    study: str | None,
    destination: str | None,
    reason: str,
) -> None:
    """Send deliveries again now (the running daemon picks them up), attempts counted anew:
    the IDs given (failed ones, or pending ones waiting out a backoff after the PACS is back),
    or with --failed every failed one (after a PACS outage)."""
    if (study or destination) and not all_failed:
        raise click.UsageError("--study and --destination go with --failed")
    if bool(delivery_ids) == all_failed:
        raise click.UsageError("give delivery IDs or --failed (one of them, not both)")
    delivery_ids = tuple(dict.fromkeys(delivery_ids))
    with admin_session(obj) as session:
        if all_failed:
            query = (
                select(Delivery)
                .join(OutputObject, Delivery.output_id == OutputObject.id)
                .join(Job, OutputObject.job_id == Job.id)
                .join(Study, Job.study_id == Study.id)
                .where(Delivery.state == DeliveryState.FAILED)
                .order_by(Delivery.id)
            )
            if study:
                query = query.where(Study.study_uid == study)
            if destination:
                query = query.where(Delivery.destination == destination)
                known = session.scalar(
                    select(Delivery.id).where(Delivery.destination == destination).limit(1)
                )
                if known is None:
                    raise NotFound(f"no delivery was ever made to a destination {destination!r}")
            chosen = list(session.scalars(query))
        else:
            chosen = [_get(session, delivery_id) for delivery_id in delivery_ids]
            for delivery in chosen:
                if delivery.state == DeliveryState.SENT:
                    raise InvalidTransition(
                        f"delivery {delivery.id} is sent; only failed or pending ones are retried"
                    )
        who = operator(reason)
        for delivery in chosen:
            _pending_again(session, delivery, who)
    if len(chosen) == 1:
        click.echo(f"delivery {chosen[0].id} pending again")
    else:
        click.echo(f"{len(chosen)} deliveries pending again")


def _pending_again(session: Session, delivery: Delivery, who: Operator) -> None:
    delivery.state = DeliveryState.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = database_now()  # the clock delivery leases are compared on
    delivery.rung_at = None
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


def _get(session: Session, delivery_id: int) -> Delivery:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise NotFound(f"delivery {delivery_id} does not exist")
    return delivery


def register(group: click.Group) -> None:
    group.add_command(deliveries)
