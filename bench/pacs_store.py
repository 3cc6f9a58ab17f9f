"""How long the PACS takes to store dicomai's SR of a 100-image study, against one of its images.

The end-to-end latency (`bench/latency.py`) ends when the SR is indexed in Orthanc; this
measures the PACS's own share of it. It builds the SR of a 100-image synthetic study with the
demo model (as the job runner does), then stores five copies of each object into Orthanc with
dcmtk `storescu -R` (one association per object kind) and prints the seconds per object:

- a 512² source image (the reference),
- the SR as dicomai writes it,
- the same SR without the image library entries' descriptors (TID 1602, optional content),
  to show whether Orthanc's time follows the bytes or the number of content items.

    .venv/bin/python bench/pacs_store.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from latency import study_files  # noqa: E402
from servers import OrthancServer  # noqa: E402

from dicomai.imaging.preprocess import prepare  # noqa: E402
from dicomai.inference.runner import Classifier  # noqa: E402
from dicomai.models.package import load_model  # noqa: E402
from dicomai.results.context import ModelIdentity, ResultContext, SourceImage  # noqa: E402
from dicomai.results.sr import build_sr  # noqa: E402

COPIES = 5
IMAGE_LIBRARY = "111028"  # DCM "Image Library"


def build_study_sr(folder: Path, images: int) -> tuple[Path, Path]:
    """Write the SR of a synthetic study of `images` 512² images; return it and one image."""
    classifier = Classifier(load_model(REPO / "models" / "demo-chest-nodule"))
    manifest = classifier.loaded.manifest
    _, files = study_files(folder / "images", images, seed=9)
    sources = []
    for file in files:
        dataset = pydicom.dcmread(file)
        sources.append(SourceImage(dataset, prepare(dataset, manifest.input)[0]))
    inputs = [
        (str(s.dataset.SOPInstanceUID), prepare(s.dataset, manifest.input)[1]) for s in sources
    ]
    found = {p.sop_instance_uid: p for p in classifier.predict(inputs)}
    context = ResultContext(
        sources=tuple(sources),
        predictions=tuple(found[uid] for uid, _ in inputs),
        model=ModelIdentity(
            manifest.name, manifest.version, manifest.architecture, manifest.weights_sha256
        ),
        input_digest="bench",
    )
    path = folder / "sr.dcm"
    build_sr(context).save_as(path, enforce_file_format=True)
    return path, files[0]


def without_library_descriptors(dataset: Dataset) -> None:
    for item in dataset.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == IMAGE_LIBRARY:
            for group in item.ContentSequence:
                for entry in group.ContentSequence:
                    if "ContentSequence" in entry:
                        del entry.ContentSequence


def copies(
    source: Path, folder: Path, change: Callable[[Dataset], None] | None = None
) -> list[Path]:
    """`COPIES` copies of `source`, each with its own SOP Instance UID (a PACS may skip a
    resent instance)."""
    folder.mkdir(parents=True)
    paths = []
    for number in range(COPIES):
        dataset = pydicom.dcmread(source)
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        if change is not None:
            change(dataset)
        path = folder / f"{number}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def elements(path: Path) -> int:
    return sum(1 for _ in pydicom.dcmread(path).iterall())


def seconds_each(pacs: OrthancServer, paths: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["storescu", "-R", "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port), *map(str, paths)],
        check=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
    )
    return (time.perf_counter() - start) / len(paths)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sr, image = build_study_sr(tmp, 100)
        kinds = {
            "512² source image": copies(image, tmp / "image"),
            "SR of 100 images": copies(sr, tmp / "sr"),
            "same SR, no library descriptors": copies(
                sr, tmp / "slim", without_library_descriptors
            ),
        }
        with OrthancServer(tmp / "pacs") as pacs:
            seconds_each(pacs, copies(image, tmp / "warm-up"))
            reference = None
            print("| object | bytes | data elements | Orthanc s per object | ÷ image |")
            print("| --- | ---: | ---: | ---: | ---: |")
            for name, paths in kinds.items():
                seconds = seconds_each(pacs, paths)
                reference = reference or seconds
                print(
                    f"| {name} | {paths[0].stat().st_size} | {elements(paths[0])} "
                    f"| {seconds:.3f} | {seconds / reference:.1f} |"
                )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
