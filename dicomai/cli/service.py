"""Long-running commands: `serve`, `worker`, `demo`."""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy import select

from dicomai.cli.main import Context
from dicomai.config import Settings


@click.command()
@click.option("--listener-only", is_flag=True, hidden=True, help="Run only the DICOM listener.")
@click.pass_obj
def serve(obj: Context, listener_only: bool) -> None:
    """Run the DICOM listener, study assembly and (embedded mode) a worker."""
    if not listener_only:  # the children inherit the folder
        _share_metrics(obj.settings)
    from dicomai.daemon import Daemon

    Daemon(obj.settings, obj.config_file, listener_only=listener_only).run()


@click.command()
@click.option("--device", default=None, help="auto, cpu or cuda:N (default: [worker] device).")
@click.pass_obj
def worker(obj: Context, device: str | None) -> None:
    """Run a standalone worker against the configured broker."""
    from dicomai.inference.device import resolve_device
    from workers.worker import run_worker

    run_worker(obj.settings, resolve_device(device or obj.settings.worker.device))


@click.command()
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=Path("models/demo-chest-nodule"),
    show_default=True,
    help="Model package to register and activate if no model is active.",
)
@click.pass_obj
def demo(obj: Context, model_dir: Path) -> None:
    """Upgrade the database, activate the demo model if none is active, then serve."""
    _share_metrics(obj.settings)
    from dicomai.audit import Operator, os_user
    from dicomai.daemon import Daemon
    from dicomai.db.migrate import upgrade
    from dicomai.db.models import ModelState, ModelVersion
    from dicomai.db.session import make_engine, make_sessionmaker
    from dicomai.rollout.deployment import activate
    from dicomai.rollout.registry import find, register

    settings = obj.settings
    upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions() as session, session.begin():
        active = session.scalar(select(ModelVersion).where(ModelVersion.state == ModelState.ACTIVE))
        if active is None:
            import tomllib

            manifest = tomllib.loads((model_dir / "model.toml").read_text())
            operator = Operator(os_user(), "dicomai demo", "demo model, none was active")
            row = find(session, manifest["name"], manifest["version"])
            if row is None:
                row = register(session, model_dir, settings.registry_dir, operator)
            activate(session, row.name, row.version, operator)
            click.echo(f"activated {row.label}")
    Daemon(settings, obj.config_file).run()


def _share_metrics(settings: Settings) -> None:
    if settings.metrics.port:
        from dicomai.metrics_server import share_between_processes

        share_between_processes(settings.metrics_dir)


def register(group: click.Group) -> None:
    for command in (serve, worker, demo):
        group.add_command(command)
