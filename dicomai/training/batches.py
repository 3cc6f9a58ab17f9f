"""Model inputs for training: images read once, cached small, augmented per epoch, normalised.

Validation images take inference's own path (`to_model_input` on the rendered image), so the
metrics that choose the thresholds and the temperature see what the daemon will see. Training
images are cached at twice the model's input size and augmented there before the same step.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dicomai.imaging.preprocess import to_model_input
from dicomai.imaging.spec import InputSpec
from dicomai.training.augment import Augmentation
from dicomai.training.datasets import LabelledImages, read_image01


class ImageDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Labelled images as ``(input (3, H, W) float32, target)`` pairs.

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
    """

    def __init__(
        self,
        images: LabelledImages,
        spec: InputSpec,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ) -> None:
        self.images = images
        self.spec = spec
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, np.ndarray] = {}
        self.targets = torch.from_numpy(images.targets)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get(index)
        if cached is None:
            cached = self._load(index)
            self._cache[index] = cached
        if self.augmentation is None:
            return torch.from_numpy(cached), self.targets[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = self.augmentation.apply(cached, rng)
        return torch.from_numpy(to_model_input(image, self.spec)), self.targets[index]

    def _load(self, index: int) -> np.ndarray:
        image = read_image01(self.images.paths[index])
        if self.augmentation is None:
            return to_model_input(image, self.spec)
        rows, cols = self.spec.size
        if image.shape[0] > 2 * rows or image.shape[1] > 2 * cols:
            image = cv2.resize(image, (2 * cols, 2 * rows), interpolation=cv2.INTER_AREA)
        return image
