"""The SR's image library (TID 1600/1601): one entry per source, built as `sr_items` shapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom import Dataset
from pydicom.datadict import dictionary_VR

from dicomai.results.sr_items import ItemSpec

# What highdicom's image library reads of a source (besides SOP Class UID and Modality, which
# are part of an entry's shape): every value here may differ between entries of one shape.
_KEYWORDS = (
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
    "PixelSpacing",
    "SliceThickness",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SpacingBetweenSlices",
    "PatientOrientation",
    "ImagerPixelSpacing",
)
# Kept of a source whose geometry highdicom cannot describe (ImagerPixelSpacing is only Type
# 3 in a CR image): the entry then says what the image is, not where.
_REDUCED = ("SOPInstanceUID", "Rows", "Columns")


@dataclass(frozen=True)
class Library:
    """The sources' entries, and what groups them as highdicom's image library does.

    Attributes
    ----------
    headers
        The first header of each (SOP class, frame of reference) among the sources: built
        into a library by highdicom, these give its groups.
    entries
        Every source's entry, in source order.
    keys
        Every source's (SOP class, frame of reference), in source order.
    """

    headers: list[Dataset]
    entries: list[ItemSpec]
    keys: list[tuple[str, str | None]]

    def members(self, header_uids: Sequence[str]) -> list[ItemSpec]:
        """The entries, in source order, of the library group that holds `header_uids`."""
        key_of = {str(header.SOPInstanceUID): _group_key(header) for header in self.headers}
        wanted = {key_of[uid] for uid in header_uids}
        return [entry for entry, key in zip(self.entries, self.keys, strict=True) if key in wanted]


def library(datasets: Sequence[Dataset]) -> Library:
    """The image library entries of `datasets` (the sources, in order)."""
    described: dict[tuple[Any, ...], bool] = {}
    headers: dict[tuple[str, str | None], Dataset] = {}
    entries, keys = [], []
    for dataset in datasets:
        header = _header(dataset, _KEYWORDS)
        shape = _shape(header)
        if shape not in described:
            described[shape] = _describable(header)
        if not described[shape]:
            header = _header(dataset, _REDUCED)
            header.Modality = ""
            shape = _shape(header)
        key = _group_key(header)
        headers.setdefault(key, header)
        keys.append(key)
        entries.append(_entry(header, shape))
    return Library(list(headers.values()), entries, keys)


def image_entry(library_dataset: Dataset) -> Dataset:
    """The IMAGE content item of a library that highdicom built from one header."""
    return library_dataset.ContentSequence[0].ContentSequence[-1]


def _header(dataset: Dataset, keywords: Sequence[str]) -> Dataset:
    header = Dataset()
    header.SOPClassUID = dataset.SOPClassUID
    header.Modality = dataset.get("Modality", "")
    for keyword in keywords:
        if keyword in dataset:
            setattr(header, keyword, dataset[keyword].value)
    return header


def _shape(header: Dataset) -> tuple[Any, ...]:
    return (
        "image",
        str(header.SOPClassUID),
        str(header.Modality),
        tuple((keyword, _vm(header[keyword].value)) for keyword in _KEYWORDS if keyword in header),
    )


def _vm(value: Any) -> int:
    if value is None or value == "":
        return 0
    return len(value) if _multi(value) else 1


def _describable(header: Dataset) -> bool:
    try:
        hd.sr.ImageLibraryEntryDescriptors(header)
    except (AttributeError, IndexError, TypeError, ValueError):  # ValueError: a private class
        return False
    return True


def _group_key(header: Dataset) -> tuple[str, str | None]:
    frame_of_reference = header.get("FrameOfReferenceUID")
    return str(header.SOPClassUID), None if frame_of_reference is None else str(frame_of_reference)


def _entry(header: Dataset, shape: tuple[Any, ...]) -> ItemSpec:
    values: dict[str, Any] = {}
    markers: dict[str, Any] = {}
    layout: list[tuple[str, int, Any]] = []
    for keyword, vm in shape[3]:
        value = header[keyword].value
        layout.append((keyword, vm, value))
        if vm == 0:
            continue  # an empty value is part of the shape
        if not _multi(value):
            values[keyword] = value
            markers[keyword] = _marker(keyword, len(markers))
        else:
            for index in range(vm):
                field = f"{keyword}.{index}"
                values[field] = value[index]
                markers[field] = _marker(keyword, len(markers))
    sop_class, modality = shape[1], shape[2]

    def build(fields: Mapping[str, Any]) -> Dataset:
        made = Dataset()
        made.SOPClassUID = sop_class
        made.Modality = modality
        for keyword, vm, empty in layout:
            if vm == 0:
                setattr(made, keyword, empty)
            elif keyword in fields:
                setattr(made, keyword, fields[keyword])
            else:
                setattr(made, keyword, [fields[f"{keyword}.{i}"] for i in range(vm)])
        return image_entry(hd.sr.ImageLibrary([made])[0])

    return ItemSpec(shape, values, markers, build)


def _multi(value: Any) -> bool:
    return not isinstance(value, str | bytes) and hasattr(value, "__len__")


def _marker(keyword: str, index: int) -> Any:
    """A value of `keyword`'s kind that no real entry holds (see `sr_items`)."""
    vr = dictionary_VR(keyword)
    if vr == "UI":
        return f"1.2.826.0.1.3680043.10.1187.{9000 + index}"
    if vr == "DS":
        return 9000.125 + index
    if vr in ("US", "UL", "IS"):
        return 60001 + index
    return f"QZ{index}"
