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
    from dicomai.models.manifest import Manifest
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
    """List registered model versions, their states and headline metrics.

    The metrics are the site evaluation's where one is recorded (the gate prefers it), else
    the package's own validation metrics; each says which it is.
    """
    from dicomai.rollout.registry import list_versions

    with admin_session(obj) as session:
        rows = [
            [
                r.name,
                r.version,
                r.architecture,
                _state(r),
                _headline_text(r),
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
    """Show a version's state, how the daemon runs it, its metrics and model card.

    Default: the active version, else the newest.
    """
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
    click.echo("\nhow the daemon runs it:")
    print_fields(_running_fields(manifest))
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
        (_PACKAGE_METRICS, manifest.get("metrics", {})),
    ):
        if table:
            click.echo(f"\n{title}:")
            print_fields([(str(k), _value(v)) for k, v in table.items()])
    _print_site_evaluation(row.evaluation)


_PACKAGE_METRICS = (
    "package metrics (model.toml [metrics]: val_* on the package's validation set, test_* on "
    "its test set)"
)


def _running_fields(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """What the daemon does with the model: its manifest as the daemon reads it, defaults
    filled in (a package that leaves out ``[input]`` runs at 224 x 224, not at no size)."""
    from dicomai.errors import ModelPackageError
    from dicomai.models.manifest import Manifest

    try:
        manifest = Manifest.from_dict(raw)
    except ModelPackageError as error:
        return [("manifest", f"not readable by this dicomai: {error}")]
    spec = manifest.input
    equalize = spec.equalize.value
    if equalize == "clahe":
        equalize += f" (clip {spec.clahe_clip:g})"
    window, window_text = spec.voi_window, "stored (the image's own VOI LUT or window)"
    if window is not None:
        preset = f"{spec.window}: " if isinstance(spec.window, str) else ""
        window_text = f"{preset}center {window[0]:g}, width {window[1]:g}"
    outputs = "each class's sigmoid (multi-label)" if manifest.multi_label else "the softmax"
    return [
        ("input size", f"{spec.size[0]} x {spec.size[1]} (rows x columns)"),
        ("colour", spec.color.value),
        ("window", window_text),
        ("frames", spec.frames.value),
        ("equalisation", equalize),
        ("normalisation", f"mean {_numbers(spec.mean)}, std {_numbers(spec.std)}"),
        ("temperature", f"{manifest.temperature:.6g} (calibration: logits / T before {outputs})"),
        ("uncertainty", _uncertainty_text(manifest)),
        (
            "heat maps",
            manifest.explanation or "the architecture's own (Grad-CAM unless it names one)",
        ),
    ]


def _uncertainty_text(manifest: Manifest) -> str:
    method = manifest.uncertainty
    if method.method == "mc_dropout":
        return f"MC dropout, {method.passes} passes (seed {method.seed}), decided on their mean"
    if method.method == "ensemble":
        files = [manifest.weights_file, *(member.file for member in manifest.ensemble)]
        return f"ensemble of {len(files)} members ({', '.join(files)}), decided on their mean"
    return "none (one pass)"


def _print_site_evaluation(evaluation: dict[str, Any] | None) -> None:
    """The site's evaluation, its numbers only (per-class tables stay in the audit trail)."""
    from dicomai.rollout.gate import evaluation_metrics

    if not evaluation:
        click.echo("\nsite evaluation: none recorded (the gate compares package metrics)")
        return
    data = evaluation.get("data")
    about = [("data", data["path"])] if isinstance(data, dict) and "path" in data else []
    scalars = {
        **{k: v for k, v in evaluation.items() if not isinstance(v, dict | list)},
        **{
            k: v
            for k, v in evaluation_metrics(evaluation).items()
            if not isinstance(v, dict | list)
        },
    }
    click.echo("\nsite evaluation (recorded by `models evaluation`; the rollout gate prefers it):")
    print_fields(about + [(str(k), _value(v)) for k, v in scalars.items()])


def _headline_text(row: ModelVersion) -> str:
    """The site evaluation's AUC and accuracy, labelled as such, else the package's
    validation ones, labelled ``validation`` (its test ones, labelled ``package test``)."""
    from dicomai.rollout.gate import evaluation_metrics, gate_metrics

    if row.evaluation:
        site = gate_metrics(evaluation_metrics(row.evaluation))
        return _labelled("site evaluation", _headline(site, ""))
    packaged = gate_metrics(row.manifest.get("metrics", {}))
    for label, prefix in (("validation", "val_"), ("package test", "test_"), ("package", "")):
        found = _headline(packaged, prefix)
        if found:
            return _labelled(label, found)
    return ""


# The figures a list shows first: the AUC (threshold-free), then the accuracy.
_HEADLINES = (("auc_macro", "auc", "auc_micro"), ("accuracy", "accuracy_argmax"))


def _headline(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """`_HEADLINES` among the metrics named ``prefix...`` (named without the prefix), else the
    first of those metrics by name."""
    found = {}
    for names in _HEADLINES:
        name = next((n for n in names if prefix + n in metrics), None)
        if name is not None:
            found[name] = metrics[prefix + name]
    named = sorted(k for k in metrics if k.startswith(prefix))
    if not found and named:
        found[named[0].removeprefix(prefix)] = metrics[named[0]]
    return found


def _labelled(label: str, metrics: dict[str, float]) -> str:
    return f"{label}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _state(row: ModelVersion) -> str:
    if row.state == ModelState.CANARY and row.canary_percent is not None:
        return f"canary ({row.canary_percent:g} %)"
    return row.state.value


def _metrics_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _numbers(values: tuple[float, ...]) -> str:
    return " ".join(f"{v:g}" for v in values)


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def register(group: click.Group) -> None:
    group.add_command(models)
