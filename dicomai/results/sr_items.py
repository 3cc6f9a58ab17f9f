"""SR content items that highdicom builds once per shape and that are re-used with other values.

A 100-image study's SR holds 100 image library entries and a measurement group per image and
class, items that differ only in a few values (UIDs, probabilities, an outline). highdicom
builds each through pydicom's attribute machinery at 5-15 ms an item, and pydicom encodes the
tree again element by element: 2.5 of the 3 s a 100-image study waited for its SR
(bench/RESULTS.md, End-to-end latency). Here the first item of each shape is built by
highdicom twice, once from its real values and once from marker values; the encoded marker
item becomes a template whose marker elements are slots, and the template counts only when it
renders the first item's real values to the very bytes pydicom wrote for highdicom's item.
Every further item of that shape is rendered from the template; a shape whose template fails
that check is built by highdicom every time. What comes out are encoded sequence items,
which `raw_sequence` turns into an element that pydicom writes as it is.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.charset import encode_string
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence_item
from pydicom.tag import Tag
from pydicom.valuerep import DS

ITEM_TAG = b"\xfe\xff\x00\xe0"
# PS3.5 7.1.2: these VRs have a reserved 16 bits and a 32-bit length in explicit VR.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_TEXT_VRS = ("LO", "SH", "UT", "LT", "ST", "UC")

Values = Mapping[str, Any]
# A content item, or a highdicom template: a list that holds its one content item.
Builder = Callable[[Values], Dataset | Sequence[Dataset]]


@dataclass(frozen=True)
class ItemSpec:
    """One content item to be: its shape, its values, and how highdicom builds it.

    Attributes
    ----------
    shape
        Everything but `values` that decides the item's content: items of one shape differ
        only in the values of their fields.
    values
        The item's own values, by field name.
    markers
        A value per field, each found nowhere else in an item of this shape and accepted by
        `build`.
    build
        Builds the item (a highdicom content item or template) from values or markers.
    """

    shape: Hashable
    values: Values
    markers: Values
    build: Builder


def encode_item(item: Dataset | Sequence[Dataset], encodings: Sequence[str]) -> bytes:
    """`item` as pydicom writes a sequence item in explicit VR little endian.

    A highdicom template (a list holding one content item) stands for its item.
    """
    if not isinstance(item, Dataset):
        (item,) = item
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_sequence_item(fp, item, list(encodings))
    return fp.getvalue()


def raw_sequence(tag: int, items: Sequence[bytes]) -> RawDataElement:
    """A sequence element of already encoded items, written by pydicom as it is."""
    value = b"".join(items)
    return RawDataElement(Tag(tag), "SQ", len(value), value, 0, False, True)


def encode_value(vr: str, value: Any, encodings: Sequence[str]) -> bytes:
    """The value field pydicom writes for `value` with `vr`, padded to even length.

    Raises
    ------
    KeyError
        For a VR that no slot uses.
    """
    if vr == "UI":
        data = str(value).encode("ascii")
        return data + b"\0" if len(data) % 2 else data
    if vr == "DS":
        number = DS(value, auto_format=True)
        text = getattr(number, "original_string", None) or str(number)
        data = text.encode("ascii")
        return data + b" " if len(data) % 2 else data
    if vr == "FD":
        return np.asarray(value, dtype="<f8").tobytes()
    if vr == "FL":
        return np.asarray(value, dtype="<f4").tobytes()
    if vr in _TEXT_VRS:
        data = encode_string(str(value), list(encodings))
        return data + b" " if len(data) % 2 else data
    raise KeyError(vr)


@dataclass(frozen=True)
class _Slot:
    field: str
    head: bytes  # tag and VR, and the reserved bytes of a long VR
    vr: str
    long: bool


@dataclass(frozen=True)
class _Sequence:
    head: bytes
    items: tuple[tuple[Node, ...], ...]


Node = bytes | _Slot | _Sequence


class ItemTemplates:
    """Encoded items of one document, each shape built by highdicom only as often as it must.

    Parameters
    ----------
    encodings
        The document's character sets (pydicom's names), for text values.
    reuse
        False builds every item with highdicom (the tests compare the two).
    shared
        Templates kept from earlier documents whose items are built alike (the same
        character sets and whatever else a `build` takes from its document rather than from
        its shape or values); new templates are added to it. By default, this document's own.
    """

    def __init__(
        self,
        encodings: Sequence[str],
        reuse: bool = True,
        shared: dict[Hashable, tuple[Node, ...] | None] | None = None,
    ) -> None:
        self._encodings = list(encodings)
        self._reuse = reuse
        self._templates: dict[Hashable, tuple[Node, ...] | None] = {} if shared is None else shared

    @property
    def encodings(self) -> list[str]:
        """The character sets that text values are encoded with."""
        return self._encodings

    def item(self, spec: ItemSpec) -> bytes:
        """The encoded item that `spec` describes."""
        shape, values, markers, build = spec.shape, spec.values, spec.markers, spec.build
        if not self._reuse:
            return encode_item(build(values), self._encodings)
        if shape not in self._templates:
            real = encode_item(build(values), self._encodings)
            template = self._template(encode_item(build(markers), self._encodings), markers)
            if template is not None and self._render_item(template, values) != real:
                template = None
            self._templates[shape] = template
            return real
        template = self._templates[shape]
        if template is None:
            return encode_item(build(values), self._encodings)
        return self._render_item(template, values)

    def _template(self, encoded: bytes, markers: Values) -> tuple[Node, ...] | None:
        lookup: dict[tuple[str, bytes], str] = {}
        for field, marker in markers.items():
            for vr in _vrs_for(marker):
                key = (vr, encode_value(vr, marker, self._encodings))
                if key in lookup:
                    return None
                lookup[key] = field
        content, end = _parse(encoded, 8, len(encoded), lookup)
        return content if end == len(encoded) and _has_slot(content) else None

    def _render_item(self, content: tuple[Node, ...], values: Values) -> bytes:
        body = self._render(content, values)
        return ITEM_TAG + struct.pack("<I", len(body)) + body

    def _render(self, content: tuple[Node, ...], values: Values) -> bytes:
        parts = []
        for node in content:
            if isinstance(node, bytes):
                parts.append(node)
            elif isinstance(node, _Slot):
                value = encode_value(node.vr, values[node.field], self._encodings)
                length = struct.pack("<I" if node.long else "<H", len(value))
                parts += [node.head, length, value]
            else:
                body = b"".join(self._render_item(item, values) for item in node.items)
                parts += [node.head, struct.pack("<I", len(body)), body]
        return b"".join(parts)


def _vrs_for(marker: Any) -> tuple[str, ...]:
    if isinstance(marker, str):
        return ("UI", *_TEXT_VRS) if _is_uid(marker) else _TEXT_VRS
    if isinstance(marker, float):
        return ("DS", "FD")
    if isinstance(marker, int):
        return ("DS",)  # highdicom writes an integer measurement as a DS only
    return ("FL",)  # a list or array of coordinates


def _is_uid(text: str) -> bool:
    return bool(text) and all(part.isdigit() for part in text.split("."))


def _parse(
    data: bytes, start: int, end: int, lookup: dict[tuple[str, bytes], str]
) -> tuple[tuple[Node, ...], int]:
    """The elements of `data[start:end]` (one item's content) as template nodes.

    A run of elements without a slot stays one bytes node; a sequence holding a slot is
    kept apart so that its length and its items' lengths are written anew.
    """
    nodes: list[Node] = []
    position = start
    while position < end:
        vr = data[position + 4 : position + 6]
        if vr in _LONG_VRS:
            header = 12
            (length,) = struct.unpack_from("<I", data, position + 8)
        else:
            header = 8
            (length,) = struct.unpack_from("<H", data, position + 6)
        value_start = position + header
        value_end = value_start + length
        if vr == b"SQ":
            items = []
            item = value_start
            while item < value_end:
                (item_length,) = struct.unpack_from("<I", data, item + 4)
                content, _ = _parse(data, item + 8, item + 8 + item_length, lookup)
                items.append(content)
                item += 8 + item_length
            node: Node = _Sequence(data[position : position + 8], tuple(items))
            if not any(_has_slot(content) for content in items):
                node = data[position:value_end]
        else:
            field = lookup.get((vr.decode("ascii"), data[value_start:value_end]))
            node = data[position:value_end]
            if field is not None:
                head = data[position : position + (8 if header == 12 else 6)]
                node = _Slot(field, head, vr.decode("ascii"), header == 12)
        if isinstance(node, bytes) and nodes and isinstance(nodes[-1], bytes):
            nodes[-1] += node
        else:
            nodes.append(node)
        position = value_end
    return tuple(nodes), position


def _has_slot(content: tuple[Node, ...]) -> bool:
    return any(
        isinstance(node, _Slot)
        or (isinstance(node, _Sequence) and any(_has_slot(item) for item in node.items))
        for node in content
    )
