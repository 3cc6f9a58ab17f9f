"""What every output builder is fed: sources, predictions, model identity, deterministic UIDs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from pydicom import Dataset

from dicomai.inference.types import ImagePrediction
from dicomai.uids import derive_uid

# How many Series Number blocks the model names are spread over (see `model_block`): two
# models share one with a chance of 1 in 1000, and a first report's numbers stay below 19000.
MODEL_BLOCKS = 1000


def model_block(name: str) -> int:
    """The Series Number block of the model named `name`, in ``range(MODEL_BLOCKS)``.

    Derived from the name alone, so it is the same in every process and for every version
    of the model, and needs nothing stored: two models active on one study put their
    series under different numbers, unless their names' hashes meet (1 in 1000).

    Parameters
    ----------
    name
        The model's name, as its package declares it.

    Returns
    -------
    int
        The block, from 0 to ``MODEL_BLOCKS - 1``.
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % MODEL_BLOCKS


@dataclass(frozen=True)
class SourceImage:
    """A classified source image: its dataset (with pixel data) and an 8-bit rendering.

    `display` is uint8 (rows, columns), the image as a viewer shows it: modality and VOI LUT
    applied, MONOCHROME1 inverted, at the source resolution, of the frame the model's result
    is for: `frame`, zero-based (the first, or with ``frames = "all"`` the one whose finding
    was most probable).
    """

    dataset: Dataset
    display: np.ndarray
    frame: int = 0


@dataclass(frozen=True)
class ModelIdentity:
    """Which algorithm produced the result (for TID 4019 and Contributing Equipment)."""

    name: str
    version: str
    architecture: str
    weights_sha256: str
    manufacturer: str = "dicomai"
    software_version: str = "0.1.0"
    # The method that drew the heat maps (`dicomai.explain.METHODS`); empty when none was drawn.
    explanation: str = ""
    # Whether its classes are independent labels (sigmoid), not one choice among them.
    multi_label: bool = False


@dataclass(frozen=True)
class ResultContext:
    """Everything an output builder needs; `predictions[i]` belongs to `sources[i]`.

    `predecessor` is the (study, series, SOP instance) UID of the SR that an earlier job of
    the same model made for the study before more images arrived; the new SR names it.
    `revision` counts the study's reports by this model, this one included: the second and
    later get series of their own numbers and descriptions ("AI findings #2 (...)"), so that a
    reader tells the updated report and overlays from the earlier ones in the series list.
    `created` is when the report was made: its SR's and overlays' Content Date and Time, and
    the date and time the overlays' captions show beside the revision.
    """

    sources: tuple[SourceImage, ...]
    predictions: tuple[ImagePrediction, ...]
    model: ModelIdentity
    input_digest: str
    uid_root: str = "2.25"
    predecessor: tuple[str, str, str] | None = None
    revision: int = 1
    created: datetime = field(default_factory=datetime.now)

    def series_number(self, first: int) -> int:
        """The Series Number of an output series of this model's report.

        ``first + 10 * (block + MODEL_BLOCKS * (revision - 1))``, `block` the model's
        (`model_block`): the last digit tells the kind of output (`first`, 9001 SR to 9004
        map), the rest the model and the report. Another model's series never take this
        model's numbers, whatever the revision (unless the two share a block), and a later
        report of a model is numbered higher than its earlier ones.

        Parameters
        ----------
        first
            The kind's number in block 0 of the first report: from 9001 to 9009.

        Returns
        -------
        int
            The Series Number, e.g. 9001 + 10 * block for the first report's SR.
        """
        slot = model_block(self.model.name) + MODEL_BLOCKS * (self.revision - 1)
        return first + 10 * slot

    def series_title(self, title: str) -> str:
        """`title` ("AI findings"), numbered from the second report on."""
        return title if self.revision == 1 else f"{title} #{self.revision}"

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].dataset.StudyInstanceUID)

    def uid(self, kind: str, source_uid: str = "") -> str:
        """The deterministic UID of an output object, series or other `kind` of identifier.

        A retried run of a job derives the same UIDs (a redelivered task makes no second
        SR). A later report gets new ones, though it may be on an input an earlier report
        had (A, a correction B, then A again): its SR names a predecessor and another
        revision, and a PACS that keeps the first object of a UID would drop it. The first
        revision keeps the derivation it always had.
        """
        revision = () if self.revision == 1 else (f"revision {self.revision}",)
        return derive_uid(
            self.study_uid,
            self.input_digest,
            self.model.name,
            self.model.version,
            kind,
            source_uid,
            *revision,
            root=self.uid_root,
        )

    def tracking_uid(self, source_uid: str, what: str) -> str:
        """The Tracking UID of `what` (a class, or "not-evaluated") in one source image.

        Unlike `uid`, neither the input digest nor the model version enters it: the SR that
        a resend's new job writes tracks the same image's same class under the same UID,
        as does a later version of the model, so a reader can match findings across them.
        """
        return derive_uid(
            self.study_uid, self.model.name, "tracking", source_uid, what, root=self.uid_root
        )

    @property
    def device_uid(self) -> str:
        """The model as a device (Device UID): the same for every study, new with new weights."""
        return derive_uid(
            "device",
            self.model.name,
            self.model.version,
            self.model.weights_sha256,
            root=self.uid_root,
        )
