"""UID grammar (PS3.5 §9.1) and deterministic output UIDs."""

from __future__ import annotations

import pytest

from dicomai.uids import derive_uid, is_valid_uid


@pytest.mark.parametrize("uid", ["1.2", "1.2.840.10008.5.1.4.1.1.2", "0.0", "2.25." + "9" * 39])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1",
        "1..2",
        ".1.2",
        "1.2.",
        "01.2",
        "1.02",
        "../etc",
        "1.2/3",
        "1.2 ",
        "1.2\n",  # `$` alone would accept a trailing newline: a line break in a spool path
        "1.2.a",
        "1." + "2" * 63,
        None,
        12,
    ],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)


def test_derived_uids_are_valid_deterministic_and_distinct() -> None:
    a = derive_uid("1.2.3", "digest", "model", "1.0.0", "sr")
    assert is_valid_uid(a)
    assert a == derive_uid("1.2.3", "digest", "model", "1.0.0", "sr")
    assert a != derive_uid("1.2.3", "other-digest", "model", "1.0.0", "sr")
    assert a != derive_uid("1.2.3", "digest", "model", "1.0.0", "sc")


def test_derived_uid_under_a_custom_root_fits_64_characters() -> None:
    root = "1.2.826.0.1.3680043.10.9999.12345678"
    uid = derive_uid("x", root=root)
    assert uid.startswith(root + ".")
    assert is_valid_uid(uid)
