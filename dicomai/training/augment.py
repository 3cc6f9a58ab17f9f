"""Training-time augmentation of radiographs: mild geometry and exposure changes, nothing more.

Radiology findings live in shape, size, density and side. The changes here stay within what a
re-positioned patient or a different exposure would give: rotations of a few degrees, a few per
cent of scale and shift, brightness and contrast jitter. Brightness and contrast follow
torchvision's ``ColorJitter`` (the seeds' recipe): the image times a factor drawn from
[1 - brightness, 1 + brightness], then its contrast about its mean by a factor drawn from
[1 - contrast, 1 + contrast], each clipped to [0, 1]. Left-right flips are off by default
(the heart's side is anatomy, and dextrocardia is a finding); random erasing is off by default
(a small lesion can be erased with its label kept). No elastic warps, blur or colour changes.
A lesion mask takes exactly the image's rotation, scale, shift and flip (nearest-neighbour, so it
stays binary) and none of the exposure changes or erasing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """How much each transform may change an image; zeros turn a transform off."""

    rotation_degrees: float = 7.0
    scale: float = 0.05
    shift: float = 0.04
    hflip: bool = False
    brightness: float = 0.1
    contrast: float = 0.1
    erase_probability: float = 0.0
    erase_area: tuple[float, float] = (0.01, 0.04)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def apply(self, image01: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Transform a float32 (rows, cols) or (rows, cols, 3) image in [0, 1]; the result
        stays in [0, 1]."""
        return self.apply_with_mask(image01, None, rng)[0]

    def apply_with_mask(
        self, image01: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Transform an image as `apply` does, and its uint8 lesion `mask` by the same geometry.

        The same `rng` gives the same image with or without a mask.
        """
        image = image01
        matrix = self._matrix(image.shape, rng)
        if matrix is not None:
            image = _warp(image, matrix, cv2.INTER_LINEAR)
            mask = None if mask is None else _warp(mask, matrix, cv2.INTER_NEAREST)
        if self.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        image = self._exposure(image, rng)
        if self.erase_probability and rng.random() < self.erase_probability:
            image = self._erase(image, rng)
        image = np.ascontiguousarray(image, dtype=np.float32)
        return image, None if mask is None else np.ascontiguousarray(mask)

    def _matrix(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
        if not (self.rotation_degrees or self.scale or self.shift):
            return None
        rows, cols = shape[:2]
        angle = rng.uniform(-self.rotation_degrees, self.rotation_degrees)
        scale = 1.0 + rng.uniform(-self.scale, self.scale)
        matrix = cv2.getRotationMatrix2D((cols / 2.0, rows / 2.0), angle, scale)
        matrix[:, 2] = matrix[:, 2] + rng.uniform(-self.shift, self.shift, 2) * (cols, rows)
        return matrix

    def _exposure(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not (self.brightness or self.contrast):
            return image
        brightness = rng.uniform(max(0.0, 1.0 - self.brightness), 1.0 + self.brightness)
        contrast = rng.uniform(max(0.0, 1.0 - self.contrast), 1.0 + self.contrast)
        # Multiplied, as ColorJitter does: an added offset had moved a dark region at 0.1 by
        # up to 0.2 where the seeds move it by 0.02.
        image = np.clip(image * brightness, 0.0, 1.0)
        mean = float(image.mean())
        return np.clip((image - mean) * contrast + mean, 0.0, 1.0)

    def _erase(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        rows, cols = image.shape[:2]
        area = rng.uniform(*self.erase_area) * rows * cols
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        height = min(rows, max(1, round(np.sqrt(area * aspect))))
        width = min(cols, max(1, round(np.sqrt(area / aspect))))
        top = int(rng.integers(0, rows - height + 1))
        left = int(rng.integers(0, cols - width + 1))
        erased = image.copy()
        # The mean of each channel: a colour image's patch is its average colour.
        erased[top : top + height, left : left + width] = image.mean(axis=(0, 1))
        return erased


def _warp(image: np.ndarray, matrix: np.ndarray, interpolation: int) -> np.ndarray:
    rows, cols = image.shape[:2]
    # Outside the image is air, as a collimated radiograph's border is: fill with black
    # (and no lesion in a mask).
    return cv2.warpAffine(
        image,
        matrix,
        (cols, rows),
        flags=interpolation,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )


NO_AUGMENTATION = Augmentation(
    rotation_degrees=0.0, scale=0.0, shift=0.0, hflip=False, brightness=0.0, contrast=0.0
)
