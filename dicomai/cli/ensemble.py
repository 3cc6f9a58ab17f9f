"""`dicomai ensemble`: packages that differ only in their weights joined into a deep ensemble
(`dicomai.training.ensemble`)."""

from __future__ import annotations

from pathlib import Path

import click

from dicomai.cli.training import _checked_name, _checked_version, labelled_images
from dicomai.training.ensemble import join_packages


@click.command("ensemble")
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("packages", nargs=-1, type=click.Path(path_type=Path))
@click.option("--name", required=True, callback=_checked_name, help="The ensemble's model name.")
@click.option(
    "--version", "model_version", default="1.0.0", show_default=True, callback=_checked_version
)
@click.option("--description", default="", help="Model card text [names the members' first's].")
@labelled_images("val", "fit and measure on")
@click.option("--overwrite", is_flag=True, help="Replace a package already in OUT.")
def ensemble(
    out: Path,
    packages: tuple[Path, ...],
    name: str,
    model_version: str,
    description: str,
    data: Path,
    labels_csv: Path | None,
    split: str,
    overwrite: bool,
) -> None:
    """Join PACKAGEs (package or run folders) that differ only in their weights into one
    deep-ensemble package in OUT, with its temperature, thresholds and metrics fitted on the
    members' averaged probabilities over labelled validation images."""
    written = join_packages(
        out,
        packages,
        name=name,
        version=model_version,
        description=description,
        data=data,
        labels_csv=labels_csv,
        split=split,
        overwrite=overwrite,
        log=lambda line: click.echo(line, err=True),
    )
    click.echo(f"{written.name} {written.version}: {out}")


def register(group: click.Group) -> None:
    group.add_command(ensemble)
