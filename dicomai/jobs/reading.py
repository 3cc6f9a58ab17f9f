"""Reading a job's instances from the spool into model inputs, on a small thread pool."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from highdicom.sr.templates import _get_coded_modality  # the image library's own table
from pydicom import Dataset
from pydicom.uid import UID

from dicomai.errors import NotEvaluable
from dicomai.imaging.decode import read_instance
from dicomai.imaging.preprocess import prepare, prepare_unless_blank, selected_frames
from dicomai.imaging.spec import InputSpec
from dicomai.models.manifest import ClassSpec
from dicomai.results.codes import referenced_as_multi_frame
from dicomai.results.context import SourceImage

log = logging.getLogger(__name__)

# An image the model could not use still has its place in the SR; it gets no overlay.
NO_DISPLAY = np.zeros((1, 1), dtype=np.uint8)


@dataclass(frozen=True)
class ReadImage:
    """One instance of a job: its source for the results and its model input, or why not."""

    sop_uid: str
    # None: unreadable, not an image, or without the Rows and Columns that an SR reference
    # describes an image by; such an instance has no place in the SR.
    source: SourceImage | None
    tensor: np.ndarray | None
    reason: str | None = None
    # With ``frames = "all"``, the model input of every frame of a multi-frame image that is
    # not blank, from which `dicomai.jobs.batching` picks the one reported; `tensor` and the
    # source's display are the first one's. `frame_indices` holds each one's zero-based frame.
    frames: tuple[np.ndarray, ...] = ()
    frame_indices: tuple[int, ...] = ()


def read_image(sop_uid: str, path: Path, spec: InputSpec) -> ReadImage:
    """Read and preprocess one instance; a property of the image is a reason, not an error.

    An image that cannot be evaluated, its pixel data missing included, keeps its source, so
    that the SR names it as not evaluated; an instance that is not an image does not.

    An unexpected error while preparing the pixels (a decoder's or a lookup table's, of
    whatever type) is a reason too, "could not be prepared": one such image had failed the job
    of its whole study, and the study's other images had no result.

    Raises
    ------
    OSError
        If the spool file cannot be read: a storage problem, which fails the job.
    MemoryError
        The worker's state, not the image's.
    """
    try:
        dataset = read_instance(path)
    except NotEvaluable as exc:
        return ReadImage(sop_uid, None, None, str(exc))
    if not _is_image(dataset):
        # An SR or RT plan a broad model "applies" to: TID 1500 references images only.
        return ReadImage(sop_uid, None, None, "not an image (no Pixel Data)")
    sop_class = str(dataset.get("SOPClassUID", ""))
    if not _standard_image_class(sop_class):
        # A vendor's private image class: the SR's image library (TID 1601) names an image by
        # its standard class's modality, so the SR could not name this one, and the study's
        # report failed with it.
        return ReadImage(sop_uid, None, None, f"SOP class {sop_class} is not a standard image")
    try:
        prepared = prepare_frames(dataset, spec)
    except NotEvaluable as exc:
        return _not_evaluated(sop_uid, dataset, str(exc))
    except (OSError, MemoryError):
        raise
    except Exception as exc:
        # The type only: an exception's message may quote the header's values.
        log.warning("%s: image could not be prepared: %s", sop_uid, type(exc).__name__)
        return _not_evaluated(
            sop_uid, dataset, f"image could not be prepared ({type(exc).__name__})"
        )
    source = SourceImage(dataset=dataset, display=prepared.display, frame=prepared.indices[0])
    if len(prepared.inputs) == 1:
        return ReadImage(sop_uid, source, prepared.inputs[0])
    return ReadImage(sop_uid, source, prepared.inputs[0], None, prepared.inputs, prepared.indices)


def _not_evaluated(sop_uid: str, dataset: Dataset, reason: str) -> ReadImage:
    source = SourceImage(dataset=dataset, display=NO_DISPLAY) if _has_size(dataset) else None
    return ReadImage(sop_uid, source, None, reason)


@dataclass(frozen=True)
class PreparedFrames:
    """The display of an image's first frame evaluated, and the model input of each frame
    evaluated (`indices`, zero-based)."""

    display: np.ndarray
    inputs: tuple[np.ndarray, ...]
    indices: tuple[int, ...]


def prepare_frames(dataset: Dataset, spec: InputSpec) -> PreparedFrames:
    """The frames of `dataset` the model evaluates, prepared.

    With ``frames = "all"`` and several frames, a blank frame (a dark lead-in or padding
    frame of an XA run or a cine) is left out: it shows nothing that the other frames could
    report Absent. A single frame, or the first with ``frames = "first"``, that is blank is
    not evaluated. An image whose IOD is a single-frame one but that holds several frames (a
    Secondary Capture of Number of Frames 2) is read by its first frame whatever `spec`
    says: a reference to it carries no frame number (PS3.3 C.10.1), so a viewer shows a
    region reported on frame 2 on frame 1.

    Raises
    ------
    NotEvaluable
        The image, or one of its frames, cannot be rendered or is too small: the image is not
        evaluated (its other frames alone could report a finding Absent that the unreadable
        one shows); or every frame is blank.
    """
    indices = selected_frames(dataset, spec)
    if len(indices) > 1 and not _frames_referenced(dataset):
        indices = indices[:1]
    if len(indices) < 2:
        only, tensor = prepare(dataset, spec)
        return PreparedFrames(only, (tensor,), (0,))
    display: np.ndarray | None = None
    inputs, kept = [], []
    for index in indices:
        try:
            prepared = prepare_unless_blank(dataset, spec, index)
        except NotEvaluable as exc:
            raise NotEvaluable(f"frame {index + 1}: {exc}" if index else str(exc)) from None
        if prepared is None:
            continue
        if display is None:
            # With several frames kept, the reported one's display replaces it (`with_frame`).
            display = prepared[0]
        inputs.append(prepared[1])
        kept.append(index)
    if display is None:
        raise NotEvaluable(f"image is blank: all {len(indices)} frames have one value each")
    return PreparedFrames(display, tuple(inputs), tuple(kept))


def _frames_referenced(dataset: Dataset) -> bool:
    # Without a SOP class (`dicomai evaluate` reads such files) the instance is trusted, as
    # `referenced_as_multi_frame` trusts it for a class it does not know.
    return "SOPClassUID" not in dataset or referenced_as_multi_frame(dataset)


def reported_frame(means: np.ndarray, classes: Sequence[ClassSpec]) -> int:
    """Which of an image's frames reports it, from the frames' (frames, classes) mean
    probabilities: that whose most probable finding is the most probable of all frames (any
    class where none is a finding), the first of equals. `dicomai evaluate` chooses so too."""
    findings = [i for i, spec in enumerate(classes) if spec.is_finding]
    columns = findings or list(range(len(classes)))
    return int(np.argmax(means[:, columns].max(axis=1)))


def with_frame(image: ReadImage, choice: int, spec: InputSpec) -> ReadImage:
    """`image` reported by `image.frames[choice]`: that frame's input and display, and its
    frame number in the source (blank frames left out of `frames` counted)."""
    source = image.source
    if source is None or not image.frames:
        raise ValueError("only an image read with all its frames has a frame to choose")
    frame = image.frame_indices[choice]
    display, _ = prepare(source.dataset, spec, frame)
    return ReadImage(
        image.sop_uid,
        SourceImage(dataset=source.dataset, display=display, frame=frame),
        image.frames[choice],
        image.reason,
    )


def viewing_order(image: ReadImage) -> tuple[bool, bool, int, str, bool, int, str]:
    """Sort key of `image` in the order a viewer shows a study: by Series Number, the series
    kept together, then by Instance Number, the SOP Instance UID breaking ties.

    "image n" of the SR and the overlay numbered n are the n-th image in this order; the UID
    order the job reads its images in put an unrelated source beside overlay n. A missing or
    unusable number (empty, multi-valued, not an integer) sorts after every number, and an
    instance without a source (it has no place in the SR) after every image. The key reads
    the files only, so a retried job builds the same objects.
    """
    dataset = image.source.dataset if image.source is not None else Dataset()
    series = _number(dataset, "SeriesNumber")
    instance = _number(dataset, "InstanceNumber")
    return (
        image.source is None,
        series is None,
        series or 0,
        # Two series of one number (a DX view per series, each numbered 1) stay apart.
        str(dataset.get("SeriesInstanceUID", "")),
        instance is None,
        instance or 0,
        image.sop_uid,
    )


def _number(dataset: Dataset, keyword: str) -> int | None:
    # An IS value read is an int (pydicom's IS); a malformed one a str, float or MultiValue.
    value = dataset.get(keyword)
    return int(value) if isinstance(value, int) else None


def _is_image(dataset: Dataset) -> bool:
    """Whether `dataset` is an image: it has Pixel Data, or its SOP class is an image storage
    class, whose pixel data are missing (PS3.6 Annex A names those "... Image Storage ...";
    the few other IODs with an Image Pixel module, segmentations, maps and volumes, are not
    what a classifier takes)."""
    if "PixelData" in dataset:
        return True
    return "Image Storage" in UID(str(dataset.get("SOPClassUID", ""))).name


@functools.lru_cache(maxsize=256)
def _standard_image_class(sop_class_uid: str) -> bool:
    try:
        _get_coded_modality(sop_class_uid)
    except ValueError:
        return False
    return True


def _has_size(dataset: Dataset) -> bool:
    # TID 1602 describes a library entry by its Pixel Data Rows and Columns; highdicom
    # cannot build an entry without them.
    return all(isinstance(dataset.get(keyword), int) for keyword in ("Rows", "Columns"))


class Reader:
    """Decodes instances on `threads` threads, so that the next images are decoded while the
    model runs on the previous ones; pydicom's decoders, numpy and OpenCV release the GIL."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(threads, "decode") if threads > 0 else None

    def read(
        self, images: Sequence[tuple[str, Path]], spec: InputSpec
    ) -> Iterator[Future[ReadImage]]:
        """Start reading `images` and yield, in order, a future for each."""
        if self._pool is None:
            for sop_uid, path in images:
                future: Future[ReadImage] = Future()
                try:
                    future.set_result(read_image(sop_uid, path, spec))
                except Exception as exc:
                    future.set_exception(exc)
                yield future
            return
        yield from [self._pool.submit(read_image, uid, path, spec) for uid, path in images]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
