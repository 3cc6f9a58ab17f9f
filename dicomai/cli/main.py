"""The `dicomai` command group: global options, error handling, and the subcommands."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import DatabaseError

from dicomai.config import Settings, load_settings
from dicomai.errors import DicomaiError

# The status a shell reports for a program that SIGPIPE killed (128 + 13), as `seq 1000000 |
# head -1` gives: the reader stopped reading, which is neither success (not everything was
# printed) nor a configuration error (2).
PIPE_CLOSED = 128 + signal.SIGPIPE

# SQLite's and PostgreSQL's words for a table the schema lacks.
_MISSING_TABLE = re.compile(r"no such table|relation .* does not exist")


def _own_words(message: str) -> str:
    """An error's message without the traceback text torch's DataLoader wraps around an error
    raised in one of its worker processes ("Caught DatasetError in DataLoader worker process
    0. Original Traceback ..."): the last line, less its ``module.Class: `` prefix."""
    if "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return _EXCEPTION_PREFIX.sub("", last, count=1)


_EXCEPTION_PREFIX = re.compile(r"^[\w.]+(Error|Exception): ")


class Group(click.Group):
    """Turns our errors into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return _flushed(super().invoke, ctx)
        except BrokenPipeError:
            _stop_writing()
            sys.exit(PIPE_CLOSED)
        except DicomaiError as exc:
            click.echo(f"error: {_own_words(str(exc))}", err=True)
            sys.exit(2)
        except DatabaseError as exc:
            detail = str(exc.orig or exc).splitlines()[0]
            if _MISSING_TABLE.search(detail):
                detail += "; run `dicomai db upgrade` to create or update the schema"
            click.echo(f"error: database unavailable: {detail}", err=True)
            sys.exit(3)
        except OSError as exc:
            # A folder or file the settings name cannot be used (missing, not writable...).
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            sys.exit(2)


def _stop_writing() -> None:
    """Point stdout at /dev/null: the reader is gone, and the flush at exit must not fail again
    (the way the Python documentation gives for SIGPIPE). Not SIGPIPE's default action: that
    would also kill `serve` when a peer closes its socket."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _flushed(invoke: Callable[[click.Context], Any], ctx: click.Context) -> Any:
    """`invoke(ctx)`, then what it left buffered flushed: a closed pipe shows here, not at
    exit, where Python prints "Exception ignored ... BrokenPipeError" and exits 120."""
    try:
        result = invoke(ctx)
    except BaseException:
        # The command's own error or exit status is the one to report, even if the reader
        # went away meanwhile.
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stop_writing()
        raise
    sys.stdout.flush()
    return result


class Context:
    """What every subcommand gets: the settings, read once, and the file they came from."""

    def __init__(self, config_file: Path | None) -> None:
        self.config_file = config_file
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_file)
            from dicomai.logs import configure_logging

            configure_logging(self._settings.log_level)
        return self._settings


@click.group(cls=Group)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    envvar="DICOMAI_CONFIG",
    help="TOML configuration file (default: $DICOMAI_CONFIG).",
)
@click.version_option(package_name="dicomai")
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None) -> None:
    """dicomai: classify DICOM studies, explain them with heat maps, report back to the PACS."""
    from dicomai.logs import configure_logging

    # Before any command runs, not only those that read the settings: a library's warning in
    # `train` or `evaluate` may quote a value of the images' headers, which the filter redacts.
    configure_logging("WARNING")
    ctx.obj = Context(config_file)


def main() -> None:
    from dicomai.cli import (
        audit,
        db,
        deliveries,
        ensemble,
        health,
        jobs,
        models,
        service,
        studies,
        training,
    )

    commands = (service, db, models, jobs, studies, deliveries, audit, health, training, ensemble)
    for module in commands:
        module.register(cli)
    cli(prog_name="dicomai")
