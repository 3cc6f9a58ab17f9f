"""UID validation and the deterministic output UIDs."""

from __future__ import annotations

import hashlib
import re

# PS3.5 §9.1: components of digits, no leading zero unless the component is "0",
# separated by single dots, at most 64 characters.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")

# Our UID root: the "2.25" UUID-derived arc (PS3.5 B.2) needs no registration.
DEFAULT_UID_ROOT = "2.25"

# derive_uid("dicomai", "implementation-class"): names our software in File Meta (PS3.10 §7.1).
IMPLEMENTATION_CLASS_UID = "2.25.155180748806027376962599326371063509316"
IMPLEMENTATION_VERSION_NAME = "DICOMAI_010"


def is_valid_uid(value: object) -> bool:
    """Return whether `value` is a UID by the full grammar of PS3.5 §9.1."""
    return isinstance(value, str) and len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def derive_uid(*parts: str, root: str = DEFAULT_UID_ROOT) -> str:
    """Derive a UID deterministically from `parts`.

    The same parts always give the same UID, so a re-run job writes objects the PACS
    already holds instead of duplicates.

    Parameters
    ----------
    parts
        Strings that identify the object (study UID, input digest, model version, kind, ...).
    root
        UID root to put the derived number under.

    Returns
    -------
    str
        A valid UID of at most 64 characters.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    if root == DEFAULT_UID_ROOT:
        # PS3.5 B.2: under 2.25 the number is a 128-bit UUID value.
        number = str(int.from_bytes(digest[:16], "big"))
    else:
        room = 64 - len(root) - 1
        number = str(int.from_bytes(digest, "big"))[:room].lstrip("0") or "1"
    uid = f"{root}.{number}"
    if not is_valid_uid(uid):
        raise ValueError(f"UID root {root!r} does not give a valid UID")
    return uid
