"""`dicomai health`: is everything this installation needs up?"""

from __future__ import annotations

import click

from dicomai.cli.main import Context
from dicomai.cli.tables import print_table


@click.command()
@click.pass_obj
def health(obj: Context) -> None:
    """Check database, a model in service, broker, spool space, waiting jobs, failed
    deliveries and the DICOM listener; exit 1 if any fails (each check has 20 s)."""
    from dicomai.health import run_checks

    results = run_checks(obj.settings)
    print_table(
        ["CHECK", "OK", "DETAIL"], [[c.name, "ok" if c.ok else "FAIL", c.detail] for c in results]
    )
    if not all(c.ok for c in results):
        raise SystemExit(1)


def register(group: click.Group) -> None:
    group.add_command(health)
