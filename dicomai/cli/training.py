"""`dicomai train-demo`: training the demonstration model."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("train-demo")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True)
def train_demo(out: Path, seed: int) -> None:
    """Train the demo model on synthetic images and write its package to OUT (not for diagnosis)."""
    from dicomai.training.demo import build_demo_package

    manifest = build_demo_package(out, seed=seed)
    click.echo(f"wrote {manifest.name} {manifest.version} to {out}")


def register(group: click.Group) -> None:
    group.add_command(train_demo)
