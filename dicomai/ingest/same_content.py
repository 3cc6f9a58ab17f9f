"""Whether a resend in another transfer syntax carries the same image as the stored instance.

A store's digest is of the encoded dataset (`dicomai.ingest.store`): cheap, but a PACS that
forwards an image in another syntax (Implicit instead of Explicit VR, RLE instead of native)
changes every byte and none of the content. Only a resend whose digest differs comes here,
so the hot path never decodes.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.tag import BaseTag

log = logging.getLogger(__name__)

# The syntaxes whose pixels decode to exactly what was encoded: the uncompressed ones, RLE,
# JPEG Lossless (Process 14 and its SV1), JPEG-LS Lossless, JPEG 2000 and HTJ2K Lossless
# Only (PS3.5 Section 8 and Annex A.4). JPEG 2000 (.91) and HTJ2K (.203) may be either.
LOSSLESS = frozenset(
    {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
    }
)

_PIXEL_DATA = 0x7FE00010
# Artefacts of an encoding, not content: group lengths (PS3.5 7.2, retired outside group
# 0002; some senders add or drop them) and Data Set Trailing Padding (PS3.10 7.2).
_TRAILING_PADDING = 0xFFFCFFFC


def same_content(stored: Path, meta: bytes, dataset: bytes | memoryview) -> bool:
    """Whether the received instance (`meta` and `dataset`, as the spool would write them)
    holds what the file `stored` holds, though encoded in another transfer syntax.

    True when the syntaxes differ, both are lossless, every element other than the File
    Meta and Pixel Data is equal and the decoded pixels are equal. Anything else, including
    either side failing to decode, is "different": the resend is then handled as a change.
    """
    try:
        return _same(pydicom.dcmread(stored), pydicom.dcmread(io.BytesIO(meta + bytes(dataset))))
    except Exception as exc:  # a pixel codec that is missing or refuses the data, a bad file
        log.info("resend compared as different: %s", type(exc).__name__)
        return False


def _same(first: Dataset, second: Dataset) -> bool:
    syntaxes = (first.file_meta.TransferSyntaxUID, second.file_meta.TransferSyntaxUID)
    if syntaxes[0] == syntaxes[1] or not all(s in LOSSLESS for s in syntaxes):
        return False
    if _elements(first) != _elements(second):
        return False
    if ("PixelData" in first) != ("PixelData" in second):
        return False
    if "PixelData" not in first:
        return True
    ours, theirs = first.pixel_array, second.pixel_array
    return bool(ours.shape == theirs.shape and np.array_equal(ours, theirs))


def _elements(dataset: Dataset) -> dict[BaseTag, Any]:
    """The dataset's element values by tag, without Pixel Data and encoding artefacts.

    Values, not VRs: an Implicit VR dataset takes its VRs from the dictionary, which may
    name another of an ambiguous tag's VRs than the sender wrote.
    """
    return {
        element.tag: _value(element.value)
        for element in dataset
        if element.tag not in (_PIXEL_DATA, _TRAILING_PADDING) and element.tag.element != 0
    }


def _value(value: Any) -> Any:
    if isinstance(value, pydicom.Sequence):
        return [_elements(item) for item in value]
    return value
