"""Model inputs for training: images read once, cached small, augmented per epoch, normalised.

Validation images take inference's own path (`to_model_input` on the rendered image), so the
metrics that choose the thresholds and the temperature see what the daemon will see. Training
images are cached at twice the model's input size and augmented there before the same step.
Lesion masks, where asked for, follow their image through every resize (nearest-neighbour) and
every geometric augmentation.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dicomai.imaging.preprocess import to_model_input
from dicomai.imaging.spec import InputSpec
from dicomai.training.augment import Augmentation
from dicomai.training.datasets import LabelledImages, read_image01, read_mask


class ImageDataset(Dataset[tuple[torch.Tensor, ...]]):
    """Labelled images as ``(input (3, H, W) float32, target)`` pairs.

    With `masks`, triples ``(input, target, mask (H, W) float32 0/1)``; an image without a
    mask file has an empty mask.

    Parameters
    ----------
    images
        Files and targets.
    spec
        The model's input specification.
    augmentation
        Applied to training images; None for validation and evaluation.
    seed
        With the epoch (`set_epoch`) and the index, seeds each image's augmentation, so a
        resumed run augments exactly as an uninterrupted one.
    masks
        Also yield each image's lesion mask (`images` must carry masks).
    """

    def __init__(
        self,
        images: LabelledImages,
        spec: InputSpec,
        augmentation: Augmentation | None = None,
        seed: int = 0,
        masks: bool = False,
    ) -> None:
        if masks and images.masks is None:
            raise ValueError("masks asked for, but the images carry none")
        self.images = images
        self.spec = spec
        self.augmentation = augmentation
        self.seed = seed
        self.masks = masks
        self.epoch = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.targets = torch.from_numpy(images.targets)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        cached = self._cache.get(index)
        if cached is None:
            cached = self._load(index)
            self._cache[index] = cached
        image, mask = cached
        if self.augmentation is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, mask = self.augmentation.apply_with_mask(image, mask, rng)
            image = to_model_input(image, self.spec)
            mask = None if mask is None else resize_mask(mask, self.spec.size)
        item = (torch.from_numpy(image), self.targets[index])
        if mask is None:
            return item
        return (*item, torch.from_numpy(mask.astype(np.float32)))

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        image = read_image01(self.images.paths[index], self.spec.voi_window, self.spec.keeps_colour)
        mask = None
        if self.masks:
            path = self.images.mask_file(index)
            shape = image.shape[:2]
            mask = np.zeros(shape, np.uint8) if path is None else read_mask(path, shape)
        if self.augmentation is None:
            model_mask = None if mask is None else resize_mask(mask, self.spec.size)
            return to_model_input(image, self.spec), model_mask
        rows, cols = self.spec.size
        if image.shape[0] > 2 * rows or image.shape[1] > 2 * cols:
            image = cv2.resize(image, (2 * cols, 2 * rows), interpolation=cv2.INTER_AREA)
            mask = None if mask is None else resize_mask(mask, (2 * rows, 2 * cols))
        return image, mask


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A lesion mask at `size` (rows, cols), each output pixel the source pixel at its centre."""
    rows, cols = size
    if mask.shape == (rows, cols):
        return mask
    # EXACT samples the source pixel under each output pixel's centre, where INTER_AREA centres
    # the image's average; plain INTER_NEAREST takes the top-left one, shifting the mask by up
    # to half an output pixel against its image.
    return cv2.resize(mask, (cols, rows), interpolation=cv2.INTER_NEAREST_EXACT)
