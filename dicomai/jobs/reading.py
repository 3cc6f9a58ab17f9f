"""Reading a job's instances from the spool into model inputs, on a small thread pool."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicomai.errors import NotEvaluable
from dicomai.imaging.decode import read_instance
from dicomai.imaging.preprocess import prepare
from dicomai.imaging.spec import InputSpec
from dicomai.results.context import SourceImage

# An image the model could not use still has its place in the SR; it gets no overlay.
NO_DISPLAY = np.zeros((1, 1), dtype=np.uint8)


@dataclass(frozen=True)
class ReadImage:
    """One instance of a job: its source for the results and its model input, or why not."""

    sop_uid: str
    source: SourceImage | None  # None: unreadable or not an image, so no SR reference
    tensor: np.ndarray | None
    reason: str | None = None


def read_image(sop_uid: str, path: Path, spec: InputSpec) -> ReadImage:
    """Read and preprocess one instance; a property of the image is a reason, not an error.

    Raises
    ------
    OSError
        If the spool file cannot be read: a storage problem, which fails the job.
    """
    try:
        dataset = read_instance(path)
    except NotEvaluable as exc:
        return ReadImage(sop_uid, None, None, str(exc))
    if "PixelData" not in dataset:
        # An SR or RT plan a broad model "applies" to: TID 1500 references images only.
        return ReadImage(sop_uid, None, None, "not an image (no Pixel Data)")
    try:
        display, tensor = prepare(dataset, spec)
    except NotEvaluable as exc:
        return ReadImage(sop_uid, SourceImage(dataset=dataset, display=NO_DISPLAY), None, str(exc))
    return ReadImage(sop_uid, SourceImage(dataset=dataset, display=display), tensor)


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
