"""Synthetic chest-radiograph-like images with painted nodules, for the demo model and tests.

The images only resemble a PA chest film (dark background, a body, two darker lung fields
either side of a bright mediastinum, curved ribs, noise); a positive image carries one bright
round "nodule" inside a lung field. Nothing here is medical data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# PS3.4 Annex B.5: the Storage SOP Classes of the two projection-radiography IODs written here.
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_SOP_CLASSES = {"DX": DX_FOR_PRESENTATION, "CR": CR_IMAGE_STORAGE}


@dataclass(frozen=True)
class SyntheticImages:
    """A generated set; index i of every array describes image i.

    Attributes
    ----------
    images
        float32 (N, size, size) in [0, 1], brighter = more attenuating (MONOCHROME2).
    labels
        int64 (N,): 1 where a nodule was painted, else 0.
    centres
        float32 (N, 2): the nodule's (row, column) centre; NaN for negatives.
    radii
        float32 (N,): the nodule's radius in pixels; 0 for negatives.
    masks
        bool (N, size, size): the pixels within the nodule's radius.
    """

    images: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    radii: np.ndarray
    masks: np.ndarray


def synthesize(
    n: int, size: int = 128, seed: int = 0, positive_fraction: float = 0.5
) -> SyntheticImages:
    """Generate `n` images deterministically from `seed`.

    Parameters
    ----------
    n
        Number of images.
    size
        Rows and columns of each (square) image; shapes scale with it.
    seed
        Seed of the numpy generator: the same arguments give the same images.
    positive_fraction
        Expected fraction of images with a nodule.

    Returns
    -------
    SyntheticImages
        Images, labels and the nodules' centres, radii and masks.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    labels = (rng.random(n) < positive_fraction).astype(np.int64)
    centres = np.full((n, 2), np.nan, np.float32)
    radii = np.zeros(n, np.float32)
    for i in range(n):
        image, lungs = _chest(rng, size)
        if labels[i]:
            centres[i], radii[i] = _place_nodule(rng, lungs, size)
            image, masks[i] = _paint_nodule(rng, image, centres[i], float(radii[i]))
        noisy = image + rng.normal(0.0, 0.025, image.shape)
        images[i] = np.clip(noisy, 0.0, 1.0)
    return SyntheticImages(images, labels, centres, radii, masks)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    return rows / size, cols / size


def _ellipse(
    rows: np.ndarray, cols: np.ndarray, centre: tuple[float, float], radii: tuple[float, float]
) -> np.ndarray:
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1.0


def _chest(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like background and the mask of its two lung fields."""
    rows, cols = _grid(size)
    image = np.full((size, size), rng.uniform(0.03, 0.10), np.float32)
    body = _ellipse(rows, cols, (0.55, 0.5), (0.55, rng.uniform(0.40, 0.46)))
    image[body] = rng.uniform(0.50, 0.62)
    lungs = np.zeros((size, size), bool)
    lung_level = rng.uniform(0.20, 0.30)
    for side in (-1.0, 1.0):
        centre = (rng.uniform(0.45, 0.52), 0.5 + side * rng.uniform(0.17, 0.21))
        lung = _ellipse(rows, cols, centre, (rng.uniform(0.28, 0.33), rng.uniform(0.11, 0.14)))
        lungs |= lung
    image[lungs] = lung_level
    image += _ribs(rng, rows, cols) * lungs
    return image, lungs


def _ribs(rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Curved, slightly brighter stripes: arcs sagging towards the patient's sides."""
    spacing = rng.uniform(0.085, 0.105)
    sag = rng.uniform(0.3, 0.6)
    phase = rows - sag * (cols - 0.5) ** 2 + rng.uniform(0.0, spacing)
    stripes = np.cos(2.0 * np.pi * phase / spacing)
    return (rng.uniform(0.05, 0.09) * np.clip(stripes, 0.0, 1.0) ** 3).astype(np.float32)


def _place_nodule(
    rng: np.random.Generator, lungs: np.ndarray, size: int
) -> tuple[np.ndarray, float]:
    """A centre well inside a lung field (its whole disc within the lung) and a radius."""
    radius = float(rng.uniform(0.04, 0.075) * size)
    inner = _erode(lungs, int(np.ceil(radius)))
    candidates = np.argwhere(inner if inner.any() else lungs)
    row, col = candidates[rng.integers(len(candidates))]
    return np.array([row, col], np.float32), radius


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    eroded = mask.copy()
    for _ in range(steps):
        shrunk = eroded.copy()
        shrunk[1:, :] &= eroded[:-1, :]
        shrunk[:-1, :] &= eroded[1:, :]
        shrunk[:, 1:] &= eroded[:, :-1]
        shrunk[:, :-1] &= eroded[:, 1:]
        eroded = shrunk
    return eroded


def _paint_nodule(
    rng: np.random.Generator, image: np.ndarray, centre: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Add a bright blob: a Gaussian whose 2-sigma contour is the nodule's radius."""
    size = image.shape[0]
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    distance2 = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2
    blob = np.exp(-distance2 / (2.0 * (radius / 2.0) ** 2))
    painted = image + rng.uniform(0.12, 0.30) * blob.astype(np.float32)
    return painted, distance2 <= radius**2


@dataclass(frozen=True)
class WrittenImage:
    """One synthetic DICOM file and the truth about it."""

    path: Path
    study_uid: str
    sop_instance_uid: str
    label: int
    centre: tuple[float, float] | None
    radius: float


def write_dicom_images(
    folder: Path,
    n: int,
    *,
    seed: int = 0,
    size: int = 256,
    modality: str = "DX",
    bits: int = 16,
    positive_fraction: float = 0.5,
) -> list[WrittenImage]:
    """Write `n` synthetic chest images as DICOM files, one study each, for demos and tests.

    Every file is a MONOCHROME2 DX (Digital X-Ray Image Storage - For Presentation) or CR image
    of the synthetic patient "Demo^Patient"; UIDs are derived from `seed`, so the same call
    writes the same objects.

    Parameters
    ----------
    folder
        Where the files go (created if missing), named ``<sop instance uid>.dcm``.
    n
        Number of images (and studies).
    seed
        Seed of the images and of the UIDs.
    size
        Rows and columns.
    modality
        ``"DX"`` or ``"CR"``.
    bits
        8 or 16 (12 bits stored) bits allocated.
    positive_fraction
        Expected fraction of images with a nodule.

    Returns
    -------
    list[WrittenImage]
        The files, their UIDs and whether (and where) a nodule was painted.
    """
    if modality not in _SOP_CLASSES or bits not in (8, 16):
        raise ValueError(f"modality must be DX or CR and bits 8 or 16, got {modality}, {bits}")
    folder.mkdir(parents=True, exist_ok=True)
    synthetic = synthesize(n, size=size, seed=seed, positive_fraction=positive_fraction)
    written = []
    for i in range(n):
        key = f"{modality}.{bits}.{size}.{seed}.{i}"
        dataset = _radiograph(synthetic.images[i], modality, bits, key, i + 1)
        path = folder / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        row, col = (float(v) for v in synthetic.centres[i])
        written.append(
            WrittenImage(
                path,
                str(dataset.StudyInstanceUID),
                str(dataset.SOPInstanceUID),
                int(synthetic.labels[i]),
                (row, col) if synthetic.labels[i] else None,
                float(synthetic.radii[i]),
            )
        )
    return written


def _radiograph(image01: np.ndarray, modality: str, bits: int, key: str, number: int) -> Dataset:
    """A projection radiograph dataset around `image01`; `key` seeds its UIDs."""
    ds = Dataset()
    ds.SOPClassUID = _SOP_CLASSES[modality]
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["dicomai-synthetic", key, "image"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["dicomai-synthetic", key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["dicomai-synthetic", key, "series"])
    _patient_and_study(ds, number)
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    # PA chest as displayed: rows run toward the patient's left, columns toward the feet.
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.Manufacturer = "dicomai synthetic"
    ds.SeriesDescription = "SYNTHETIC chest image (not a patient)"
    _pixels(ds, image01, bits)
    if modality == "DX":
        _dx_modules(ds)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _patient_and_study(ds: Dataset, number: int) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Demo^Patient"
    ds.PatientID = "DEMO0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = f"{number}"
    ds.AccessionNumber = f"DEMO{number:06d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC chest radiograph"


def _pixels(ds: Dataset, image01: np.ndarray, bits: int) -> None:
    stored = 8 if bits == 8 else 12
    top = (1 << stored) - 1
    pixels = np.round(image01 * top).astype(np.uint8 if bits == 8 else np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = (top + 1) // 2, top + 1
    ds.PixelData = pixels.tobytes()


def _dx_modules(ds: Dataset) -> None:
    """The DX Series, DX Image, DX Detector and Acquisition Context attributes (PS3.3 C.8.11)."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.AcquisitionContextSequence = []
    ds.ImageLaterality = "U"
    ds.PositionerType = ""
    # PS3.16 CID 4 and CID 4010: codes as pydicom's code dictionary holds them.
    ds.AnatomicRegionSequence = [_code("816094009", "SCT", "Chest")]
    ds.ViewCodeSequence = [_code("272479007", "SCT", "postero-anterior")]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
