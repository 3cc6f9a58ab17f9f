"""Printing rows for a terminal: aligned columns, times in UTC, JSON lines for scripts."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """Columns padded to their widest cell; an empty list prints only the header."""
    text = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(c) for c in col) for col in zip(*text, strict=True)]
    for row in text:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_fields(fields: list[tuple[str, Any]]) -> None:
    """``name: value`` lines, names aligned."""
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        click.echo(f"{name + ':':<{width + 1}} {'' if value is None else value}")


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, default=str, sort_keys=True))


def print_rows(header: list[str], rows: list[dict[str, Any]], as_json: bool) -> None:
    """A listing: one JSON object per row for scripts, else a table of the rows' values."""
    if as_json:
        for row in rows:
            print_json(row)
        return
    print_table(header, [list(row.values()) for row in rows])
