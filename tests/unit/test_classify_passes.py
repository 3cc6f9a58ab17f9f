"""Shared forward passes over claimed jobs: a pass starts while later images still decode.

The reader here is dicomai's own (threads, futures); the images are stand-ins whose "decoding"
the test controls, and the classifier records its passes, so that the order of reading and
classifying can be observed without a model.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dicomai.imaging.spec import InputSpec
from dicomai.inference.types import ImagePrediction
from dicomai.ingest.spool import Spool
from dicomai.jobs.batching import classify
from dicomai.jobs.claims import Claim
from dicomai.jobs.reading import Reader, ReadImage

SPEC = InputSpec(size=(8, 8))


class RecordingClassifier:
    """Classifies any tensor as evaluated, and remembers each pass's SOP Instance UIDs."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.loaded = SimpleNamespace(manifest=SimpleNamespace(input=SPEC))
        self.passes: list[list[str]] = []

    def predict(self, images: list[tuple[str, np.ndarray]]) -> list[ImagePrediction]:
        self.passes.append([uid for uid, _ in images])
        return [ImagePrediction(sop_instance_uid=uid, evaluated=True) for uid, _ in images]


def claim(job_id: int, uids: list[str]) -> Claim:
    instances = tuple((uid, f"1.2/{uid}.dcm") for uid in uids)
    return Claim(job_id, "1.2", "digest", 1, "model", False, instances)


def test_a_large_job_runs_its_first_pass_before_its_last_image_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classifier = RecordingClassifier(batch_size=2)
    first_pass = threading.Event()
    uids = [f"1.2.{n}" for n in range(1, 6)]

    def read_image(sop_uid: str, path: Path, spec: InputSpec) -> ReadImage:
        if sop_uid == uids[-1] and not first_pass.wait(timeout=30):
            raise AssertionError("the last image was needed before any pass ran")
        return ReadImage(sop_uid, None, np.zeros((3, 8, 8), np.float32))

    original = classifier.predict

    def predict(images: list[tuple[str, np.ndarray]]) -> list[ImagePrediction]:
        first_pass.set()
        return original(images)

    classifier.predict = predict  # type: ignore[method-assign]
    monkeypatch.setattr("dicomai.jobs.reading.read_image", read_image)
    reader = Reader(threads=2)
    try:
        (job,) = classify(classifier, reader, Spool(tmp_path), [claim(1, uids)])  # type: ignore[arg-type]
    finally:
        reader.close()

    assert job.error is None
    assert classifier.passes == [uids[0:2], uids[2:4], uids[4:5]]
    assert [p.sop_instance_uid for p in job.predictions()] == uids
    assert all(p.evaluated for p in job.predictions())


def test_a_job_whose_file_cannot_be_read_fails_alone_after_sharing_a_pass(
    tmp_path: Path,
) -> None:
    classifier = RecordingClassifier(batch_size=2)
    reader = _ScriptedReader({"1.3.3": OSError("spool file gone")})
    broken = claim(1, ["1.3.1", "1.3.2", "1.3.3", "1.3.4"])
    healthy = claim(2, ["1.4.1", "1.4.2", "1.4.3"])

    jobs = classify(classifier, reader, Spool(tmp_path), [broken, healthy])  # type: ignore[arg-type]

    assert isinstance(jobs[0].error, OSError)
    assert jobs[0].images == [] and jobs[0].evaluated == {}
    # The broken job's first two images had their pass; its fourth never reaches the model.
    assert classifier.passes == [["1.3.1", "1.3.2"], ["1.4.1", "1.4.2"], ["1.4.3"]]
    assert jobs[1].error is None
    assert [p.evaluated for p in jobs[1].predictions()] == [True, True, True]


class _ScriptedReader:
    """A serial reader whose futures fail for the UIDs in `failures`."""

    def __init__(self, failures: dict[str, Exception]) -> None:
        self.failures = failures

    def read(self, images: list[tuple[str, Path]], spec: InputSpec) -> list[Future[ReadImage]]:
        futures = []
        for uid, _ in images:
            future: Future[ReadImage] = Future()
            if uid in self.failures:
                future.set_exception(self.failures[uid])
            else:
                future.set_result(ReadImage(uid, None, np.zeros((3, 8, 8), np.float32)))
            futures.append(future)
        return futures
