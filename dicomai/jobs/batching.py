"""Classifying the images of one or more claimed jobs in shared forward passes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dicomai.inference.runner import Classifier
from dicomai.inference.types import ImagePrediction
from dicomai.ingest.spool import Spool
from dicomai.jobs.claims import Claim
from dicomai.jobs.reading import Reader, ReadImage, reported_frame, viewing_order, with_frame
from dicomai.results.context import SourceImage

log = logging.getLogger(__name__)


@dataclass
class Classified:
    """One job's images and what the model said about them, or why the job cannot go on."""

    claim: Claim
    images: list[ReadImage] = field(default_factory=list)  # in viewing order once all read
    evaluated: dict[str, ImagePrediction] = field(default_factory=dict)
    error: Exception | None = None

    @property
    def sources(self) -> list[SourceImage]:
        """The images an SR can reference: read, with pixel data, in viewing order."""
        return [image.source for image in self.images if image.source is not None]

    def predictions(self) -> list[ImagePrediction]:
        """One per instance of the job, in viewing order; those not evaluated say why."""
        return [
            self.evaluated.get(image.sop_uid)
            or ImagePrediction(sop_instance_uid=image.sop_uid, evaluated=False, reason=image.reason)
            for image in self.images
        ]


def classify(
    classifier: Classifier, reader: Reader, spool: Spool, claims: Sequence[Claim]
) -> list[Classified]:
    """Read every claimed job's images and classify them together, at most the classifier's
    batch size per forward pass; each job gets back its own predictions.

    Decoding runs ahead on the reader's threads, and a pass starts as soon as a batch of
    images is ready, so a large study's later images decode while its first batch runs. An
    error reading a job's files fails that job alone (its passes so far are dropped), and so
    does one its images cause in the model.

    Images are read and batched in the claim's order; once all of a job's are read, they are
    put in the study's viewing order (`viewing_order`), the order of its results: "image n"
    of the SR and the overlay numbered n are that order's n-th image.
    """
    spec = classifier.loaded.manifest.input
    jobs = [Classified(claim) for claim in claims]
    futures = [
        list(reader.read([(uid, spool.path(path)) for uid, path in claim.instances], spec))
        for claim in claims
    ]
    pending: list[tuple[int, str, np.ndarray]] = []
    for owner, (job, reads) in enumerate(zip(jobs, futures, strict=True)):
        try:
            for future in reads:
                image = future.result()
                if image.frames:
                    image = _reported_frame(classifier, image)
                job.images.append(image)
                if image.tensor is not None:
                    pending.append((owner, image.sop_uid, image.tensor))
                if len(pending) >= classifier.batch_size:
                    _run_pass(classifier, jobs, pending[: classifier.batch_size])
                    del pending[: classifier.batch_size]
            # Predictions are matched by UID, so the passes need not follow this order.
            job.images.sort(key=viewing_order)
        except Exception as exc:
            job.error = exc
            job.images.clear()
            job.evaluated.clear()
            pending = [item for item in pending if item[0] != owner]
    if pending:
        _run_pass(classifier, jobs, pending)
    return jobs


def _reported_frame(classifier: Classifier, image: ReadImage) -> ReadImage:
    """`image` with the frame it is reported by: that whose most probable finding is the most
    probable of all frames (a finding on any frame is a finding of the image), the first of
    equals. Only that frame is explained; the others are classified, not explained.
    """
    manifest = classifier.loaded.manifest
    means = []
    for start in range(0, len(image.frames), classifier.batch_size):
        chunk = np.stack(image.frames[start : start + classifier.batch_size])
        batch = torch.from_numpy(chunk).to(classifier.device)
        means.append(classifier.summary(batch).mean)
    frame = reported_frame(np.concatenate(means), manifest.classes)
    chosen = with_frame(image, frame, manifest.input)
    number = chosen.source.frame + 1 if chosen.source is not None else frame + 1
    log.debug("%s: reported by frame %d (blank frames left out)", image.sop_uid, number)
    return chosen


def _run_pass(
    classifier: Classifier, jobs: list[Classified], inputs: list[tuple[int, str, np.ndarray]]
) -> None:
    try:
        predictions = classifier.predict([(uid, tensor) for _, uid, tensor in inputs])
    except Exception as exc:
        owners = sorted({owner for owner, _, _ in inputs})
        if len(owners) == 1:
            jobs[owners[0]].error = exc
            return
        # Which job's images broke the shared pass is unknown: each job's run on their own,
        # so the failure stays with its job and the others finish.
        log.warning("a pass of %d jobs failed (%s); one by one", len(owners), type(exc).__name__)
        for owner in owners:
            _run_pass(classifier, jobs, [item for item in inputs if item[0] == owner])
        return
    for (owner, uid, _), prediction in zip(inputs, predictions, strict=True):
        jobs[owner].evaluated[uid] = prediction
