"""What reaches the log: no part of a patient's name, no control character from a peer."""

from __future__ import annotations

import logging
import sys

import pytest

from dicomai.ingest.protocol import MalformedPDU
from dicomai.logs import PHIFilter


def filtered(name: str, message: str, *args: object) -> str:
    record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)
    assert PHIFilter().filter(record)
    return record.getMessage()


WARNING = (
    'The string "{}" is unlikely to represent the intended person name since it contains '
    "only a single component."
)


@pytest.mark.parametrize("name", ['ZZ"LEAKQUOTE', "ZZLEAK\nNEWLINE", "O'LEAKBRIEN", "ZZLEAK"])
def test_no_part_of_a_quoted_name_survives_a_library_warning(name: str) -> None:
    text = filtered("py.warnings", WARNING.format(name))
    assert "LEAK" not in text, text
    assert text.startswith("The string '<redacted>' is unlikely"), text


def test_pydicom_values_with_quotes_are_redacted_whole() -> None:
    text = filtered("pydicom", "Invalid value for VR PN: %r", "DOE^J'LEAK\"X")
    assert "LEAK" not in text and "Invalid value for VR PN" in text, text


def test_control_characters_from_a_peer_are_escaped_in_every_message() -> None:
    text = filtered("dicomai.ingest.scp", "association rejected (%s)", "EV\nFAKE LINE\x1b[2J")
    assert "\n" not in text and "\x1b" not in text
    assert "EV\\x0aFAKE LINE\\x1b[2J" in text, text


def test_our_own_messages_keep_their_values() -> None:
    assert filtered("dicomai.jobs", "job %d of '%s' done", 3, "demo") == "job 3 of 'demo' done"


def test_a_record_whose_arguments_do_not_fit_its_message_does_not_raise_at_the_caller() -> None:
    record = logging.LogRecord(
        "pynetdicom", logging.ERROR, __file__, 1, "%s and %s", ("one",), None
    )
    assert PHIFilter().filter(record)


def _record_of(error: Exception, name: str) -> logging.LogRecord:
    try:
        raise error
    except Exception:
        info = sys.exc_info()
    record = logging.LogRecord(name, logging.ERROR, __file__, 1, error, (), info)
    assert PHIFilter().filter(record)
    return record


def test_our_own_errors_logged_by_a_library_lose_their_traceback_not_their_message() -> None:
    record = _record_of(MalformedPDU("aborting association: malformed PDU"), "pynetdicom.dul")
    assert record.exc_info is None and record.getMessage() == "aborting association: malformed PDU"


def test_unexpected_errors_keep_their_traceback_without_the_values_they_quote() -> None:
    error = ValueError("Unable to convert '19840211' to 'DA' object")
    text = _record_of(error, "dicomai.jobs.runner").getMessage()
    assert "Traceback (most recent call last)" in text and "raise error" in text, text
    assert "ValueError: Unable to convert '<redacted>' object" in text, text
    assert "19840211" not in text


def test_a_quoted_value_with_a_newline_or_in_an_exception_group_is_redacted_whole() -> None:
    name = "ZQ" + "DOE\nZQJOHN"
    with_newline = ValueError(f"Unable to convert '{name}' to 'DA' object")
    text = _record_of(with_newline, "dicomai.jobs.runner").getMessage()
    assert "ZQDOE" not in text and "ZQJOHN" not in text, text
    group = ExceptionGroup("2 images failed", [ValueError(f"bad '{name}'"), KeyError("x")])
    text = _record_of(group, "dicomai.jobs.runner").getMessage()
    assert "ZQDOE" not in text and "ZQJOHN" not in text, text
    assert "ExceptionGroup: 2 images failed" in text and "KeyError" in text, text


def test_an_exceptions_control_characters_are_escaped_and_a_deep_chain_does_not_raise() -> None:
    text = _record_of(ValueError("bad AE EV\x1b[2J\x07"), "dicomai.ingest").getMessage()
    assert "\x1b" not in text and "\x07" not in text and "\\x1b[2J" in text, text
    error: BaseException = KeyError("first")
    for depth in range(1500):  # deeper than Python's recursion limit
        caused = ValueError(depth)
        caused.__cause__ = error
        error = caused
    try:
        raise error
    except ValueError:
        info = sys.exc_info()
    record = logging.LogRecord("dicomai.jobs", logging.ERROR, __file__, 1, "job failed", (), info)
    assert PHIFilter().filter(record)
    assert record.getMessage().startswith("job failed\n"), record.getMessage()[:200]
