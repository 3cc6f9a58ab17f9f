"""Training and evaluation data on disk: image folders or DICOM with a labels CSV, checked up front.

Two layouts are read:

- image folders: ``DIR/train/<class>/<image>``, optional ``DIR/val/`` and ``DIR/test/`` with the
  same class folders; images are PNG, JPEG or DICOM (``.png``, ``.jpg``, ``.jpeg``, ``.dcm``,
  ``.dicom``);
- a folder of images (any depth) and a labels CSV: ``file,label`` (one label per image, binary or
  multi-class) or ChestX-ray14's ``Image Index,Finding Labels`` with ``|``-separated labels
  (multi-label; ``No Finding`` is the empty set). An optional ``split`` column (``train``, ``val``,
  ``test``) assigns images to sets; without it, a ``Patient ID`` column keeps each patient's
  images on one side of the validation split. The CSV is UTF-8; a file name with no folder part
  may name an image at any depth, if only one has that name.

Either layout may carry lesion masks, for networks that also segment: a ``DIR/masks/`` tree
mirroring the image folders (``masks/train/<class>/<stem>.png`` for ``train/<class>/<stem>.*``),
or a ``mask`` column naming a PNG relative to the CSV. A mask is 0 for background and non-zero for
lesion, the size of its image. An image without one has an empty mask only if it shows no finding
(`require_masks`).

Every problem (no class folder, a class without training or validation images, a CSV naming a
file that is not there or an image twice) is a `DatasetError` with a one-line message, raised
before any training starts.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dicomai.errors import DatasetError, NotEvaluable
from dicomai.imaging.preprocess import render
from dicomai.training.trainer import stratified_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
SPLITS = ("train", "val", "test")
# ChestX-ray14 (Wang et al., CVPR 2017) writes the empty label set as this pseudo-label.
NO_FINDING = "no finding"
_FILE_COLUMNS = ("image index", "file", "filename", "path", "image", "image_path")
_LABEL_COLUMNS = ("finding labels", "label", "labels", "class", "target")
# Columns of one label per image, where an empty cell is a mistake rather than "no finding".
_ONE_LABEL_COLUMNS = ("label", "class", "target")
_PATIENT_COLUMNS = ("patient id", "patient_id", "patientid")
MASKS_FOLDER = "masks"
MASK_COLUMN = "mask"


class Task(StrEnum):
    """What the network predicts: one of two classes, one of many, or any subset of classes."""

    BINARY = "binary"
    MULTICLASS = "multiclass"
    MULTILABEL = "multilabel"


@dataclass(frozen=True)
class LabelledImages:
    """Image files and their targets: int64 (N,) class indices, or float32 (N, C) multi-hot.

    ``masks`` is None where the layout has no lesion masks; else each image's mask file, or None
    (CSV: an empty ``mask`` cell). In a ``masks/`` tree the path is where the file belongs, which
    `require_masks` checks.
    """

    paths: tuple[Path, ...]
    targets: np.ndarray
    masks: tuple[Path | None, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray) -> LabelledImages:
        masks = None if self.masks is None else tuple(self.masks[i] for i in indices)
        return LabelledImages(tuple(self.paths[i] for i in indices), self.targets[indices], masks)

    def mask_file(self, index: int) -> Path | None:
        """The mask file of image `index`, None if it has none (an empty mask)."""
        path = None if self.masks is None else self.masks[index]
        return path if path is not None and path.is_file() else None


@dataclass(frozen=True)
class TrainingData:
    """The classes, the task and the training, validation and (optional) test sets."""

    classes: tuple[str, ...]
    task: Task
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def has_masks(self) -> bool:
        """Whether the layout carries lesion masks (a ``masks/`` tree or a ``mask`` column)."""
        return self.train.masks is not None

    def summary(self) -> dict[str, Any]:
        """Counts per set and class, for the manifest's training table and the report."""
        sets = {"train": self.train, "val": self.val}
        if self.test is not None:
            sets["test"] = self.test
        summary: dict[str, Any] = {"task": self.task.value, **self.notes}
        for name, images in sets.items():
            summary[f"n_{name}"] = len(images)
            summary[f"{name}_per_class"] = class_counts(images, self.classes, self.task)
        return summary


def class_counts(images: LabelledImages, classes: tuple[str, ...], task: Task) -> dict[str, int]:
    """Images per class (a multi-label image counts once for each of its labels)."""
    if task is Task.MULTILABEL:
        totals = images.targets.sum(axis=0) if len(images) else np.zeros(len(classes))
        return {name: int(totals[i]) for i, name in enumerate(classes)}
    counts = np.bincount(images.targets, minlength=len(classes)) if len(images) else None
    return {name: int(counts[i]) if counts is not None else 0 for i, name in enumerate(classes)}


def load_training_data(
    root: Path, labels_csv: Path | None = None, val_fraction: float = 0.2, seed: int = 0
) -> TrainingData:
    """Find the images and labels under `root` and split off validation where none is given.

    Parameters
    ----------
    root
        The data folder.
    labels_csv
        A labels CSV; without it `root` must hold the image-folder layout.
    val_fraction
        Fraction of each class held out for validation when there is no ``val/`` (or no
        ``val`` rows in the CSV's ``split`` column); whole patients where the CSV has a
        ``Patient ID`` column.
    seed
        Seed of that split.

    Returns
    -------
    TrainingData
        The sets, each non-empty but the optional test set; every class has training and
        validation images.

    Raises
    ------
    DatasetError
        A one-line message naming what is wrong with the layout or the CSV.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    where = root if labels_csv is None else Path(labels_csv)
    data = _from_folders(root) if labels_csv is None else _from_csv(root, where)
    _refuse_case_variants(data["classes"], where)
    if data.get("val") is None:
        patients = data.get("patients")
        train, val = _hold_out(data["train"], data["task"], val_fraction, seed, patients)
        unit = "images" if patients is None else "patients"
        note = f"stratified {round(val_fraction * 100)} % of the training {unit}, seed {seed}"
    else:
        train, val, note = data["train"], data["val"], "given"
    if len(train) == 0 or len(val) == 0:
        raise DatasetError(f"{root}: too few images to train and validate ({len(data['train'])})")
    notes = {"source": data["source"], "validation": note}
    if train.masks is not None:
        notes["masks"] = data["masks"]
    loaded = TrainingData(
        classes=data["classes"],
        task=data["task"],
        train=train,
        val=val,
        test=data.get("test"),
        notes=notes,
    )
    _require_every_class(loaded, where)
    return loaded


def require_masks(data: TrainingData, findings: Sequence[bool]) -> None:
    """Check that every training and validation image showing a finding has its mask file.

    Parameters
    ----------
    data
        Training data whose layout carries masks.
    findings
        Per class, whether it is a finding. An image of no finding class (multi-label: with no
        label of one) may go without a mask: it has no lesion.

    Raises
    ------
    DatasetError
        Naming the first few missing mask files (or, for a CSV, images with an empty cell).
    """
    finding = np.asarray(findings, dtype=bool)
    missing: list[str] = []
    for images in (data.train, data.val):
        if images.masks is None:
            raise DatasetError("the data carry no lesion masks")
        targets = images.targets
        positive = (targets[:, finding] > 0).any(axis=1) if targets.ndim == 2 else finding[targets]
        for i in np.flatnonzero(positive):
            if images.mask_file(int(i)) is None:
                expected = images.masks[i]
                missing.append(str(expected) if expected else f"{images.paths[i]} (no mask named)")
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise DatasetError(f"no lesion mask for {len(missing)} image(s) with a finding: {shown}")


def read_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A lesion mask file as uint8 (rows, cols): 1 where any colour channel is non-zero, else 0.

    Raises
    ------
    DatasetError
        If the file cannot be read or its size differs from its image's `shape`.
    """
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise DatasetError(f"{path}: unreadable mask image")
    if pixels.ndim == 3:
        # Channels past the third are alpha, often opaque everywhere: not lesion.
        pixels = pixels[..., :3].max(axis=2)
    if pixels.shape != tuple(shape[:2]):
        rows, cols = pixels.shape
        raise DatasetError(f"{path}: mask is {rows}x{cols}, its image {shape[0]}x{shape[1]}")
    return (pixels > 0).astype(np.uint8)


def load_evaluation_data(
    root: Path,
    classes: tuple[str, ...],
    labels_csv: Path | None = None,
    split: str = "test",
    log: Callable[[str], object] = lambda _: None,
) -> LabelledImages:
    """The labelled images a model package is evaluated on, its class order imposed.

    With image folders, `root` is either a layout with a `split` folder (``test/`` by default)
    or holds the class folders itself; a ``masks/`` folder beside them (``masks/test/<class>/``,
    or ``masks/<class>/``) gives the images' lesion masks, as for training. With a CSV, rows of
    the ``split`` column equal to `split` are used if the column exists, else every row; its
    ``mask`` column gives the masks.

    Raises
    ------
    DatasetError
        On a layout problem, or a class the package does not know.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    if labels_csv is not None:
        rows = _read_csv(Path(labels_csv))
        if any(row.split for row in rows):
            rows = [row for row in rows if row.split == split]
        else:
            log(
                f"note: {labels_csv} has no split column: every row is evaluated; images the "
                "model was trained on would flatter it"
            )
        if not rows:
            raise DatasetError(f"{labels_csv}: no rows for the {split!r} set")
        multilabel = _is_multilabel(rows)
        return _labelled(root, rows, classes, multilabel, labels_csv)
    masks = root / MASKS_FOLDER if (root / MASKS_FOLDER).is_dir() else None
    if (root / split).is_dir():
        return _class_folders(root / split, classes, masks=None if masks is None else masks / split)
    others = [name for name in SPLITS if (root / name).is_dir()]
    if others:
        raise DatasetError(f"{root}: no {split}/ folder (it has {', '.join(others)})")
    return _class_folders(root, classes, masks=masks)


def read_image01(
    path: Path, window: tuple[float, float] | None = None, colour: bool = False
) -> np.ndarray:
    """An image file as float32 (rows, cols) in [0, 1], brighter = denser, as inference renders it.

    DICOM goes through `dicomai.imaging.preprocess.render` (modality and VOI LUTs, MONOCHROME1),
    with the package's window (`InputSpec.voi_window`) in place of the image's own where it
    sets one; PNG and JPEG (8 or 16 bits, grey or colour) become their luminance, which no
    window changes. With `colour` (`InputSpec.keeps_colour`) a colour image stays RGB,
    (rows, cols, 3).

    Raises
    ------
    DatasetError
        If the file cannot be read or decoded.
    """
    if path.suffix.lower() in DICOM_SUFFIXES:
        try:
            return render(pydicom.dcmread(path), window=window, colour=colour)
        except (OSError, InvalidDicomError, NotEvaluable, AttributeError) as error:
            raise DatasetError(f"{path}: unreadable DICOM image: {error}") from error
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise DatasetError(f"{path}: unreadable image")
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels[..., :3], cv2.COLOR_BGR2RGB if colour else cv2.COLOR_BGR2GRAY)
    maximum = 65535.0 if pixels.dtype == np.uint16 else 255.0 if pixels.dtype == np.uint8 else 1.0
    return np.clip(pixels.astype(np.float32) / maximum, 0.0, 1.0)


def _from_folders(root: Path) -> dict[str, Any]:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(
            f"{root}: no train/ folder (expected train/<class>/<image>, or give --labels CSV)"
        )
    classes = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    if len(classes) < 2:
        raise DatasetError(f"{train_dir}: needs at least two class folders, found {len(classes)}")
    data: dict[str, Any] = {
        "classes": classes,
        "task": Task.BINARY if len(classes) == 2 else Task.MULTICLASS,
        "source": "image folders",
    }
    masks = root / MASKS_FOLDER if (root / MASKS_FOLDER).is_dir() else None
    if masks is not None:
        data["masks"] = f"{MASKS_FOLDER}/ folder"
    for split in SPLITS:
        if (root / split).is_dir():
            data[split] = _class_folders(
                root / split,
                classes,
                require_all=split == "train",
                masks=None if masks is None else masks / split,
            )
    return data


def _class_folders(
    folder: Path, classes: tuple[str, ...], require_all: bool = False, masks: Path | None = None
) -> LabelledImages:
    # A masks/ folder beside the class folders is not a class.
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and p != masks)
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise DatasetError(f"{folder / unknown[0]}: class not in {', '.join(classes)}")
    paths: list[Path] = []
    targets: list[int] = []
    for index, name in enumerate(classes):
        files = _images_in(folder / name) if (folder / name).is_dir() else []
        if require_all and not files:
            raise DatasetError(f"{folder / name}: no images ({', '.join(IMAGE_SUFFIXES)})")
        paths += files
        targets += [index] * len(files)
    if not paths:
        raise DatasetError(f"{folder}: no images in class folders {', '.join(classes)}")
    mask_paths = None
    if masks is not None:
        mask_paths = tuple(masks / path.relative_to(folder).with_suffix(".png") for path in paths)
    return LabelledImages(tuple(paths), np.asarray(targets, dtype=np.int64), mask_paths)


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


@dataclass(frozen=True)
class _Row:
    file: str
    labels: tuple[str, ...]
    split: str
    mask: str | None = None
    line: int = 0
    patient: str = ""


def _read_csv(path: Path) -> list[_Row]:
    header, table = _read_table(path)
    file_col = _column(header, _FILE_COLUMNS, path, "file")
    label_col = _column(header, _LABEL_COLUMNS, path, "label")
    split_col = header.index("split") if "split" in header else None
    mask_col = header.index(MASK_COLUMN) if MASK_COLUMN in header else None
    patient_col = next((header.index(name) for name in _PATIENT_COLUMNS if name in header), None)
    one_label = header[label_col] in _ONE_LABEL_COLUMNS
    rows = []
    for number, row in table:
        if len(row) <= max(file_col, label_col):
            raise DatasetError(f"{path}:{number}: expected at least {len(header)} columns")
        if one_label and not row[label_col].strip():
            raise DatasetError(f"{path}:{number}: no label")
        labels = tuple(v.strip() for v in row[label_col].split("|") if v.strip())
        labels = tuple(v for v in labels if v.lower() != NO_FINDING)
        split = _cell(row, split_col).lower()
        if split and split not in SPLITS:
            raise DatasetError(f"{path}:{number}: split {split!r} is not train, val or test")
        mask = None if mask_col is None else _cell(row, mask_col)
        file = row[file_col].strip()
        rows.append(_Row(file, labels, split, mask, number, _cell(row, patient_col)))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The CSV's lower-case header and its non-blank rows, each with its line number."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read: {error.strerror}") from error
    # Excel's "CSV UTF-8" starts with a byte order mark; its plain "CSV" is Windows-1252.
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text; save the CSV as UTF-8") from error
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip().lower() for name in next(reader, [])]
    table = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    return header, table


def _cell(row: list[str], column: int | None) -> str:
    return row[column].strip() if column is not None and column < len(row) else ""


def _column(header: list[str], names: tuple[str, ...], path: Path, what: str) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise DatasetError(f"{path}: no {what} column (one of: {', '.join(names)})")


def _is_multilabel(rows: list[_Row]) -> bool:
    return any(len(row.labels) != 1 for row in rows)


def _from_csv(root: Path, labels_csv: Path) -> dict[str, Any]:
    rows = _read_csv(labels_csv)
    multilabel = _is_multilabel(rows)
    classes = tuple(sorted({label for row in rows for label in row.labels}))
    minimum = 1 if multilabel else 2
    if len(classes) < minimum:
        raise DatasetError(f"{labels_csv}: needs at least {minimum} classes, found {len(classes)}")
    data: dict[str, Any] = {
        "classes": classes,
        "task": Task.MULTILABEL
        if multilabel
        else (Task.BINARY if len(classes) == 2 else Task.MULTICLASS),
        "source": f"labels CSV {labels_csv.name}",
        "masks": f"{MASK_COLUMN} column of {labels_csv.name}",
    }
    everything = _labelled(root, rows, classes, multilabel, labels_csv)
    has_split = any(row.split for row in rows)
    splits = np.asarray([(row.split or "train") if has_split else "train" for row in rows])
    for split in SPLITS:
        chosen = np.flatnonzero(splits == split)
        if len(chosen):
            data[split] = everything.subset(chosen)
    if "train" not in data:
        raise DatasetError(f"{labels_csv}: no training rows")
    if any(row.patient for row in rows):
        # An image without a patient ID is a patient of its own: nothing ties it to others.
        patients = np.asarray([row.patient or row.file for row in rows])
        data["patients"] = patients[splits == "train"]
    return data


def _labelled(
    root: Path, rows: list[_Row], classes: tuple[str, ...], multilabel: bool, source: Path
) -> LabelledImages:
    paths = _resolve(root, rows, source)
    _refuse_duplicates(rows, paths, source)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for row in rows for label in row.labels if label not in index})
    if unknown:
        raise DatasetError(f"{source}: label {unknown[0]!r} is not one of {', '.join(classes)}")
    if multilabel:
        targets = np.zeros((len(rows), len(classes)), dtype=np.float32)
        for i, row in enumerate(rows):
            targets[i, [index[label] for label in row.labels]] = 1.0
    else:
        targets = np.asarray([index[row.labels[0]] for row in rows], dtype=np.int64)
    return LabelledImages(tuple(paths), targets, _mask_files(rows, source))


def _mask_files(rows: list[_Row], source: Path) -> tuple[Path | None, ...] | None:
    """The ``mask`` column's files, relative to the CSV; None without the column."""
    if rows[0].mask is None:
        return None
    masks = tuple(source.parent / row.mask if row.mask else None for row in rows)
    missing = [
        str(row.mask) for row, path in zip(rows, masks, strict=True) if path and not path.is_file()
    ]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DatasetError(f"{source}: mask {missing[0]!r}{more} not found under {source.parent}")
    return masks


def _resolve(root: Path, rows: list[_Row], source: Path) -> list[Path]:
    """Each row's file under `root`: as written, else (a bare name only) the one file so named.

    Only a bare name is looked for at any depth: a path with folders names one patient's or
    study's image, and another folder's file of the same name is another image.
    """
    by_name: dict[str, list[Path]] | None = None
    paths = []
    missing = []
    for row in rows:
        direct = root / row.file
        if direct.is_file():
            paths.append(direct)
            continue
        if Path(row.file).name != row.file:
            missing.append(row)
            continue
        if by_name is None:
            # ChestX-ray14 ships its images in images_001/images/ ... images_012/images/.
            by_name = {}
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                by_name.setdefault(path.name, []).append(path)
        found = by_name.get(row.file, [])
        if len(found) > 1:
            raise DatasetError(
                f"{source}:{row.line}: {row.file!r} matches {len(found)} files under {root} "
                f"({found[0]}, {found[1]}, ...): write its folder in the CSV"
            )
        if found:
            paths.append(found[0])
        else:
            missing.append(row)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        first = missing[0]
        raise DatasetError(f"{source}:{first.line}: {first.file!r}{more} not found under {root}")
    return paths


def _refuse_duplicates(rows: list[_Row], paths: list[Path], source: Path) -> None:
    """Refuse an image listed twice: its copies could land in both training and validation."""
    first: dict[Path, _Row] = {}
    for row, path in zip(rows, paths, strict=True):
        earlier = first.setdefault(path.resolve(), row)
        if earlier is row:
            continue
        if set(earlier.labels) != set(row.labels):
            raise DatasetError(
                f"{source}:{row.line}: {row.file!r} is labelled {_shown(row.labels)} here "
                f"and {_shown(earlier.labels)} on line {earlier.line}"
            )
        raise DatasetError(
            f"{source}:{row.line}: {row.file!r} is listed again (first on line {earlier.line})"
        )


def _shown(labels: tuple[str, ...]) -> str:
    return repr("|".join(labels) or "No Finding")


def _hold_out(
    images: LabelledImages,
    task: Task,
    fraction: float,
    seed: int,
    patients: np.ndarray | None = None,
) -> tuple[LabelledImages, LabelledImages]:
    """Split off validation; with `patients` (one ID per image), whole patients.

    A patient's other images would let validation reward memorising that patient.
    """
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"validation fraction must be in (0, 1), got {fraction}")
    strata = _strata(images, task)
    if patients is None:
        split = stratified_split(strata, fraction, seed)
        return images.subset(split.train), images.subset(split.val)
    names, patient_of = np.unique(patients, return_inverse=True)
    split = stratified_split(_patient_strata(strata, patient_of, len(names)), fraction, seed)
    held = np.isin(patient_of, split.val)
    return images.subset(np.flatnonzero(~held)), images.subset(np.flatnonzero(held))


def _patient_strata(strata: np.ndarray, patient_of: np.ndarray, n_patients: int) -> np.ndarray:
    """Each patient's stratum: the rarest of its images' strata, as `_strata` ranks images."""
    counts = Counter(strata.tolist())
    best: dict[int, tuple[float, int]] = {}
    for patient, stratum in zip(patient_of.tolist(), strata.tolist(), strict=True):
        # -1 (no finding, or a label too rare to stratify) gives way to any class.
        rank = (float("inf") if stratum == -1 else counts[stratum], stratum)
        best[patient] = min(best.get(patient, rank), rank)
    return np.asarray([best[p][1] for p in range(n_patients)], dtype=np.int64)


def _strata(images: LabelledImages, task: Task) -> np.ndarray:
    """A class index per image to stratify on; a multi-label image by its rarest label."""
    if task is not Task.MULTILABEL:
        return images.targets
    targets = images.targets
    frequency = targets.sum(axis=0)
    # Rarest label first, so that rare findings reach the validation set; -1 for no finding.
    rarity = np.where(targets > 0, frequency[None, :], np.inf)
    strata = np.where(targets.any(axis=1), rarity.argmin(axis=1), -1)
    counts = Counter(strata.tolist())
    return np.asarray([s if counts[s] > 1 else -1 for s in strata.tolist()], dtype=np.int64)


def _refuse_case_variants(classes: tuple[str, ...], where: Path) -> None:
    seen: dict[str, str] = {}
    for name in classes:
        first = seen.setdefault(name.casefold(), name)
        if first != name:
            raise DatasetError(f"{where}: classes {first!r} and {name!r} differ only in case")


def _require_every_class(data: TrainingData, where: Path) -> None:
    """Refuse a class never learnt, or one whose validation metrics would be undefined."""
    note = data.notes["validation"]
    held_out = "" if note == "given" else f" (validation set: {note})"
    for kind, images in (("training", data.train), ("validation", data.val)):
        counts = class_counts(images, data.classes, data.task)
        empty = [name for name, count in counts.items() if count == 0]
        if empty:
            raise DatasetError(f"{where}: class {empty[0]!r} has no {kind} image{held_out}")
