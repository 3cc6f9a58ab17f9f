"""Structured logging with the PHI filter: pydicom's and structlog's known leaks closed."""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any

import structlog

from dicomai.errors import DicomaiError

# pydicom 3.0.2 logs and warns invalid values verbatim ("Invalid value for VR DA: '1970-01-01'"),
# so a value quoted in a message from these sources is replaced, whatever the field.
# From the first quote to the last of the same kind, across lines: a value may itself hold
# quotes or a newline ('ZZ"LEAK', "NAME\nREST"), and a lazy match stopped inside it.
_LEAKY_LOGGERS = ("pydicom", "py.warnings", "highdicom")
_QUOTED = re.compile(r"""(['"]).*\1""", re.DOTALL)
# A peer's AE title or a dataset value with a newline or an escape sequence would forge
# log lines or drive the administrator's terminal.
# Tracebacks that add nothing for the reader: our own errors carry a message made for them (a
# library may log one with logging.exception), and pynetdicom's text decoder logs each failed
# codec of a peer's malformed PDU before the PDU itself is reported.
_TRACEBACK_FREE = ("pynetdicom.utils",)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_NOT_NEWLINE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class PHIFilter(logging.Filter):
    """Redacts quoted values in messages from libraries known to echo dataset contents, and
    escapes control characters in every message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):  # structlog's own event: rendered, not formatted
            return True
        try:
            message = record.getMessage()
        except Exception:  # a library's mismatched % arguments, which logging would print
            record.msg, record.args = f"unformattable log message from {record.name}", None
            return True
        # An exception logged as the message (`log.exception(exc)`) says what its traceback
        # does; see `_redacted_traceback`.
        if record.name.startswith(_LEAKY_LOGGERS) or isinstance(record.msg, BaseException):
            message = _QUOTED.sub("'<redacted>'", message)
        record.msg = _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", message)
        record.args = None
        if record.exc_info and (
            isinstance(record.exc_info[1], DicomaiError) or record.name in _TRACEBACK_FREE
        ):
            record.exc_info = record.exc_text = None
        elif record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg}\n{_redacted_traceback(record.exc_info)}"
            record.exc_info = record.exc_text = None
        return True


def _redacted_traceback(exc_info: Any) -> str:
    """The traceback, its frames as they are and each exception's own text redacted.

    An unexpected error's message often quotes the value it choked on (pydicom's "Unable to
    convert '19840211' to 'DA' object", highdicom's "'ZQ' is not a valid PatientSexValues"):
    a birth date or a name would reach the log. Each exception's text (message, notes, over
    several lines or not) is redacted as a whole, so a quoted value with a newline in it goes
    too, and its control characters are escaped; chained exceptions and the members of an
    exception group each get theirs. Never raises: a filter that raised would lose the line.
    """
    try:
        return _format_redacted(traceback.TracebackException(*exc_info))
    except Exception:  # a chain too deep to format, an exception whose text raises...
        return f"(traceback omitted: {getattr(exc_info[0], '__name__', 'exception')})"


def _format_redacted(top: traceback.TracebackException) -> str:
    parts: list[str] = []
    seen: set[int] = set()
    # Depth-first, causes before what they caused, as Python prints a chain; a loop, not
    # recursion, so that a chain a thousand deep cannot overflow the stack.
    pending: list[tuple[traceback.TracebackException, str]] = [(top, "")]
    order: list[tuple[traceback.TracebackException, str]] = []
    while pending:
        exception, joint = pending.pop()
        if id(exception) in seen:
            continue
        seen.add(id(exception))
        order.append((exception, joint))
        if exception.__cause__ is not None:
            pending.append((exception.__cause__, _CAUSE))
        elif exception.__context__ is not None and not exception.__suppress_context__:
            pending.append((exception.__context__, _CONTEXT))
    for exception, joint in reversed(order):
        _add_exception(exception, parts)
        parts.append(joint)
    return "".join(parts).rstrip("\n")


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _add_exception(exception: traceback.TracebackException, parts: list[str]) -> None:
    if exception.stack:
        parts.append("Traceback (most recent call last):\n")
        parts.extend(exception.stack.format())
    text = _QUOTED.sub("'<redacted>'", "".join(exception.format_exception_only()))
    text = _CONTROL_NOT_NEWLINE.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
    parts.append(text if text.endswith("\n") else text + "\n")
    for member in exception.exceptions or ():  # an ExceptionGroup's
        parts.append(_format_redacted(member) + "\n")


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    """Route stdlib, structlog and warnings through one handler that filters PHI."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=_plain_traceback)
    )
    shared: list[structlog.types.Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        # show_locals=False: a traceback's locals may hold a dataset or a patient name.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(PHIFilter())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom at INFO logs every association in detail; its warnings are what an admin needs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Except a warning per UID of a request that is not a transfer syntax: a peer's request of
    # thousands of them wrote megabytes (its rejection or the missing context says enough).
    logging.getLogger("pynetdicom.presentation").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )


def _plain_traceback(sio: object, exc_info: object) -> None:
    structlog.dev.plain_traceback(sio, exc_info)  # type: ignore[arg-type]
