"""Running a loaded model package on preprocessed images: calibrated scores and heat maps."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from dicomai.explain.gradcam import gradcam
from dicomai.inference.types import ClassScore, ImagePrediction
from dicomai.models.package import LoadedModel


def cpu_threads() -> int:
    """The cores this process may run on (its affinity, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Classifier:
    """Classifies and explains images with one model package.

    Parameters
    ----------
    loaded
        The package, as `dicomai.models.package.load_model` returns it.
    device
        Torch device to run on, e.g. ``"cpu"`` or ``"cuda:0"``; the network is moved there.
    batch_size
        Most images per forward pass; bounds memory on large studies.
    cam_method
        The Grad-CAM family method (see `dicomai.explain.gradcam.METHODS`).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        cam_method: str = "gradcam",
    ) -> None:
        self.loaded = loaded
        self.device = torch.device(device)
        self.batch_size = max(1, batch_size)
        self.cam_method = cam_method
        self.module = loaded.module.to(self.device).eval()
        self._memory_format = torch.contiguous_format
        if self.device.type == "cpu":
            # One intra-op thread per core this process may run on (its affinity, which a
            # container or systemd's CPUAffinity narrows), not per core the machine has.
            torch.set_num_threads(cpu_threads())
            # channels_last: resnet50 batch 8 514 ms vs 608-725 ms, densenet121 364 vs
            # 480-505 ms on 2 cores (FACTS.md).
            self._memory_format = torch.channels_last
            self.module = self.module.to(memory_format=torch.channels_last)
        manifest = loaded.manifest
        self._findings = [i for i, spec in enumerate(manifest.classes) if spec.is_finding]

    def predict(self, inputs: Sequence[tuple[str, np.ndarray]]) -> list[ImagePrediction]:
        """Classify images and explain each one's most probable finding.

        Parameters
        ----------
        inputs
            ``(sop_instance_uid, image)`` pairs; each image float32 (3, H, W), preprocessed
            with the package's input specification.

        Returns
        -------
        list[ImagePrediction]
            One per input, in order: a score per class (softmax of logits divided by the
            manifest's temperature), the most probable class, and a Grad-CAM heat map
            (float32 (H, W) in [0, 1]) of the most probable finding class.
        """
        predictions: list[ImagePrediction] = []
        for start in range(0, len(inputs), self.batch_size):
            predictions += self._predict_batch(inputs[start : start + self.batch_size])
        return predictions

    def _predict_batch(self, inputs: Sequence[tuple[str, np.ndarray]]) -> list[ImagePrediction]:
        rows, cols = self.loaded.manifest.input.size
        for uid, image in inputs:
            if image.shape != (3, rows, cols):
                raise ValueError(f"{uid}: input of shape {image.shape}, expected {(3, rows, cols)}")
        batch = torch.from_numpy(np.stack([image for _, image in inputs])).float()
        batch = batch.to(self.device).contiguous(memory_format=self._memory_format)
        probabilities = self.probabilities(batch)
        explained = self._explained_classes(probabilities)
        heatmaps: np.ndarray | list[None] = [None] * len(inputs)
        if explained:
            heatmaps = gradcam(self.module, batch, explained, method=self.cam_method)
        classes = self.loaded.manifest.classes
        return [
            ImagePrediction(
                sop_instance_uid=uid,
                evaluated=True,
                scores=tuple(
                    ClassScore(spec.name, spec.code, float(p), spec.threshold, spec.is_finding)
                    for spec, p in zip(classes, row, strict=True)
                ),
                predicted=classes[int(np.argmax(row))].name,
                explained=classes[explained[i]].name if explained else None,
                heatmap=heatmaps[i],
            )
            for i, ((uid, _), row) in enumerate(zip(inputs, probabilities, strict=True))
        ]

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Calibrated class probabilities, float64 (N, classes), for a batch on the device."""
        with torch.inference_mode():
            logits = self.module(batch).double()
        return torch.softmax(logits / self.loaded.manifest.temperature, dim=1).cpu().numpy()

    def _explained_classes(self, probabilities: np.ndarray) -> list[int]:
        """Per image, the finding class with the highest probability; none without findings."""
        if not self._findings:
            return []
        best = np.argmax(probabilities[:, self._findings], axis=1)
        return [self._findings[int(i)] for i in best]
