"""What dicomai writes into DICOM text is ASCII (docs/conformance.md §5)."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import dicomai


def test_every_string_dicomai_writes_is_ascii() -> None:
    # A multiplication sign in a not-evaluated reason switched a report whose source has
    # no character set, or ISO_IR 126/144, to UTF-8, while the study's overlays kept the
    # source's set. Any message may end up in an SR comment, a description or a caption.
    found = []
    for path in sorted(Path(dicomai.__file__).parent.rglob("*.py")):
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        for token in tokens:
            docstring = token.string.lstrip("rbf").startswith(('"""', "'''"))
            if token.type == tokenize.STRING and not docstring and not token.string.isascii():
                found.append(f"{path.name}:{token.start[0]}: {token.string[:60]}")
    assert not found, "\n".join(found)
