"""`dicomai models`: the registry, deployment states, the evaluation gate and comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.cli.main import Context
from dicomai.cli.session import admin_session, operator
from dicomai.cli.tables import print_fields, print_table, when
from dicomai.db.models import AuditEvent, ModelState, ModelVersion

if TYPE_CHECKING:
    from dicomai.rollout.gate import GateDecision

_REASON = click.option("--reason", default="", help="Why; recorded in the audit trail.")


@click.group()
def models() -> None:
    """Model registry and deployment."""


@models.command("register")
@click.argument("path", type=click.Path(path_type=Path))
@_REASON
@click.pass_obj
def models_register(obj: Context, path: Path, reason: str) -> None:
    """Check the package at PATH (folder or .tar) and add it to the registry."""
    from dicomai.rollout.registry import register

    with admin_session(obj) as session:
        row = register(session, path, obj.settings.registry_dir, operator(reason))
        click.echo(f"registered {row.label} ({row.architecture}, sha256 {row.weights_sha256[:12]})")


@models.command("list")
@click.pass_obj
def models_list(obj: Context) -> None:
    """List registered model versions, their states and headline metrics."""
    from dicomai.rollout.gate import gate_metrics
    from dicomai.rollout.registry import list_versions

    with admin_session(obj) as session:
        rows = [
            [
                r.name,
                r.version,
                r.architecture,
                _state(r),
                _metrics_text(gate_metrics(r.manifest.get("metrics", {}))),
                when(r.state_changed_at),
            ]
            for r in list_versions(session)
        ]
    print_table(["NAME", "VERSION", "ARCHITECTURE", "STATE", "METRICS", "SINCE"], rows)


@models.command("show")
@click.argument("name")
@click.argument("version", required=False)
@click.pass_obj
def models_show(obj: Context, name: str, version: str | None) -> None:
    """Show a version's state, metrics and model card (default: the active, else newest)."""
    with admin_session(obj) as session:
        row = _pick(session, name, version)
        _print_card(row)
        history = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.object_type == "model", AuditEvent.object_id == row.label)
            .order_by(AuditEvent.id)
        ).all()
        click.echo("\nhistory:")
        print_table(
            ["AT", "ACTOR", "ACTION", "REASON"],
            [[when(e.at), e.actor, e.action, e.detail.get("reason", "")] for e in history],
        )


@models.command("shadow")
@click.argument("name")
@click.argument("version")
@_REASON
@click.pass_obj
def models_shadow(obj: Context, name: str, version: str, reason: str) -> None:
    """Run NAME VERSION on new studies and store its results without sending them."""
    from dicomai.rollout.deployment import shadow

    with admin_session(obj) as session:
        row = shadow(session, name, version, operator(reason))
        click.echo(f"{row.label} is shadow: it runs on new studies and sends nothing")
        _echo_handed_over(session, None)


@models.command("canary")
@click.argument("name")
@click.argument("version")
@click.option("--percent", type=float, required=True, help="Share of studies it sends for.")
@_REASON
@click.pass_obj
def models_canary(obj: Context, name: str, version: str, percent: float, reason: str) -> None:
    """Run NAME VERSION on new studies and send its results for PERCENT % of them."""
    from dicomai.rollout.deployment import canary

    with admin_session(obj) as session:
        row = canary(session, name, version, percent, operator(reason))
        # Queued studies too, but never a second report: see `sends_results`.
        click.echo(
            f"{row.label} is canary: it reports on {percent:g} % of the studies it runs on, "
            "except where another version's report went out already"
        )
        _echo_handed_over(session, None)


@models.command("activate")
@click.argument("name")
@click.argument("version")
@_REASON
@click.option("--force", is_flag=True, help="Override the evaluation gate (needs --reason).")
@click.pass_obj
def models_activate(obj: Context, name: str, version: str, reason: str, force: bool) -> None:
    """Make NAME VERSION the active version for new jobs, if the evaluation gate allows."""
    from dicomai.rollout.deployment import activate, active_version

    tolerance = obj.settings.rollout.gate_tolerance
    with admin_session(obj) as session:
        leaving = active_version(session, name)
        row = activate(session, name, version, operator(reason), tolerance=tolerance, force=force)
        click.echo(f"{row.label} is active{_gate_text(session.info.pop('dicomai_gate', None))}")
        _echo_handed_over(session, leaving)


@models.command("rollback")
@click.argument("name")
@_REASON
@click.pass_obj
def models_rollback(obj: Context, name: str, reason: str) -> None:
    """Make the version of NAME active before the current one active again; retire the current."""
    from dicomai.rollout.deployment import rollback

    with admin_session(obj) as session:
        restored, retired = rollback(session, name, operator(reason))
        click.echo(f"{restored.label} is active again; {retired.label} is retired")
        _echo_handed_over(session, retired)


@models.command("retire")
@click.argument("name")
@click.argument("version")
@_REASON
@click.option("--force", is_flag=True, help="Retire the active version too (needs --reason).")
@click.pass_obj
def models_retire(obj: Context, name: str, version: str, reason: str, force: bool) -> None:
    """Stop running NAME VERSION on new studies."""
    from dicomai.rollout.deployment import retire

    with admin_session(obj) as session:
        row = retire(session, name, version, operator(reason), force=force)
        click.echo(f"{row.label} is retired")
        _echo_handed_over(session, row)


def _gate_text(gate: GateDecision | None) -> str:
    """The gate's evidence and verdict, for an activation that went through."""
    if gate is None:
        return ""
    return f"; gate {'passed' if gate.passed else 'overridden (--force)'}: {gate.message}"


def _echo_handed_over(session: Session, retired: ModelVersion | None) -> None:
    """Say what the change did to jobs in flight (`deployment._HandOver`)."""
    cancelled, queued = session.info.pop("dicomai_hand_over", (0, {}))
    if retired is not None and cancelled:
        click.echo(f"{cancelled} queued job(s) of {retired.label} cancelled")
    whose = "of its studies" if retired is not None else "studies in flight"
    for label, count in sorted(queued.items()):
        click.echo(f"{count} {whose} queued for {label}, which reports on them now")


@models.command("evaluation")
@click.argument("name")
@click.argument("version")
@click.argument("file", type=click.Path(path_type=Path))
@_REASON
@click.pass_obj
def models_evaluation(obj: Context, name: str, version: str, file: Path, reason: str) -> None:
    """Record the site's evaluation of NAME VERSION on its reference set (a JSON FILE)."""
    from dicomai.rollout.gate import evaluation_metrics, gate_metrics, read_evaluation
    from dicomai.rollout.registry import record_evaluation

    evaluation = read_evaluation(file)
    with admin_session(obj) as session:
        row = record_evaluation(session, name, version, evaluation, operator(reason))
        metrics = _metrics_text(gate_metrics(evaluation_metrics(evaluation)))
        click.echo(f"evaluation of {row.label} recorded: {metrics}")


@models.command("compare")
@click.argument("name")
@click.argument("first")
@click.argument("second")
@click.pass_obj
def models_compare(obj: Context, name: str, first: str, second: str) -> None:
    """How versions FIRST and SECOND of NAME agreed on the images both evaluated."""
    from dicomai.rollout.compare import compare_versions
    from dicomai.rollout.registry import get

    with admin_session(obj) as session:
        result = compare_versions(session, get(session, name, first), get(session, name, second))
    mad = result.mean_abs_difference
    print_fields(
        [
            ("shared images", result.shared_images),
            ("shared studies", result.shared_studies),
            ("mean |p1 - p2|", "n/a" if mad is None else f"{mad:.4f}"),
            ("different top finding", result.different_top_finding),
        ]
    )
    click.echo("")
    print_table(
        ["FINDING", "BOTH +", "BOTH -", f"ONLY {first} +", f"ONLY {second} +", "AGREEMENT"],
        [
            [
                a.label,
                a.both_positive,
                a.both_negative,
                a.only_first,
                a.only_second,
                f"{a.rate:.0%}",
            ]
            for a in result.agreements
        ],
    )


def _pick(session: Session, name: str, version: str | None) -> ModelVersion:
    from dicomai.errors import NotFound
    from dicomai.rollout.registry import get

    if version is not None:
        return get(session, name, version)
    rows = session.scalars(
        select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.id.desc())
    ).all()
    if not rows:
        raise NotFound(f"model {name} is not registered")
    return next((r for r in rows if r.state == ModelState.ACTIVE), rows[0])


def _print_card(row: ModelVersion) -> None:
    manifest = row.manifest
    scope = {k: v for k, v in manifest.get("applies_to", {}).items() if v}
    print_fields(
        [
            ("model", row.label),
            ("state", _state(row)),
            ("architecture", row.architecture),
            ("registered", when(row.registered_at)),
            ("state since", when(row.state_changed_at)),
            ("weights sha256", row.weights_sha256),
            ("description", manifest.get("description", "")),
            ("applies to", ", ".join(f"{k}={v}" for k, v in scope.items()) or "any image"),
        ]
    )
    click.echo("\nclasses:")
    print_table(
        ["NAME", "CODE", "MEANING", "THRESHOLD", "FINDING"],
        [
            [
                c["name"],
                f"{c['code']['scheme']} {c['code']['value']}",
                c["code"]["meaning"],
                c.get("threshold", 0.5),
                "yes" if c.get("is_finding") else "no",
            ]
            for c in manifest.get("classes", [])
        ],
    )
    for title, table in (
        ("training", manifest.get("training", {})),
        ("metrics", manifest.get("metrics", {})),
        ("site evaluation", row.evaluation or {}),
    ):
        if table:
            click.echo(f"\n{title}:")
            print_fields([(str(k), _value(v)) for k, v in table.items()])


def _state(row: ModelVersion) -> str:
    if row.state == ModelState.CANARY and row.canary_percent is not None:
        return f"canary ({row.canary_percent:g} %)"
    return row.state.value


def _metrics_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def register(group: click.Group) -> None:
    group.add_command(models)
