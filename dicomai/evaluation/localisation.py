"""Whether the heat maps point at the lesions of a test set with masks, for each method.

Which explanation method follows a network's evidence depends on the trained network, not only
on its architecture (Grad-CAM's maximum fell inside the lesion on 0.0 to 1.0 of the images
across DenseNet-Transformers of one recipe and different seeds), so `dicomai evaluate` measures
every method on the site's own images and the package can name the one that points
(``explanation`` in model.toml).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch

from dicomai.explain.gradcam import gradcam, methods_for
from dicomai.inference.runner import Classifier
from dicomai.training.batches import resize_mask
from dicomai.training.datasets import LabelledImages, read_image01, read_mask

log = logging.getLogger(__name__)

LOCALISATION = "localisation"
# The pointing game's tolerance (Zhang et al., ECCV 2016): 15 pixels at 224², scaled.
MARGIN_AT_224 = 15.0


def mask_pointing_hits(maps: np.ndarray, masks: np.ndarray, margin: float) -> np.ndarray:
    """Whether each map's maximum lies on its lesion mask or within `margin` pixels of it.

    Parameters
    ----------
    maps
        (N, H, W) heat maps.
    masks
        (N, H, W) lesion masks, non-zero on the lesion; each must mark at least one pixel.
    margin
        Tolerance in pixels.

    Returns
    -------
    numpy.ndarray
        bool (N,).

    Raises
    ------
    ValueError
        If the shapes differ or a mask is empty.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps of shape {maps.shape} for masks of shape {masks.shape}")
    hits = np.zeros(len(maps), dtype=bool)
    for index, (heat, mask) in enumerate(zip(maps, masks, strict=True)):
        if not mask.any():
            raise ValueError(f"mask {index} marks no lesion")
        # Distance of every pixel to the nearest lesion pixel (zero on the lesion).
        outside = np.where(mask > 0, 0, 255).astype(np.uint8)
        distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        row, col = np.unravel_index(int(heat.argmax()), heat.shape)
        hits[index] = distance[row, col] <= margin
    return hits


def localisation_metrics(
    classifier: Classifier, images: LabelledImages, inputs: list[np.ndarray]
) -> dict[str, object]:
    """The pointing game of every explanation method on the images with a lesion mask.

    Each such image is explained for its true finding (the first one, for a multi-label
    image, whose mask then holds all its lesions) by the package's network in fp32 (an
    ensemble by its first member); images whose truth names no finding, or that have no mask,
    are left out. A method that fails on the network scores NaN rather than stopping the
    evaluation.

    Parameters
    ----------
    classifier
        The package, as the daemon runs it.
    images
        The test set with its ``masks``.
    inputs
        The images as the model sees them, in the order of `images`.

    Returns
    -------
    dict
        ``pointing`` {method: fraction of hits} for each method that can explain the
        network (`dicomai.explain.methods_for`), ``n_lesion``, ``margin_px``, ``method``
        (the one the package's heat maps use) and ``best`` (the method that pointed most
        often; the package's own on a tie or without lesions).

    Raises
    ------
    DatasetError
        If a mask file is unreadable or not the size of its image.
    """
    manifest = classifier.loaded.manifest
    size = manifest.input.size
    findings = [i for i, spec in enumerate(manifest.classes) if spec.is_finding]
    chosen, targets, masks = [], [], []
    for index, path in enumerate(images.paths):
        finding = _true_finding(images.targets[index], findings)
        mask_path = images.mask_file(index)
        if finding is None or mask_path is None:
            continue
        mask = resize_mask(read_mask(mask_path, read_image01(path).shape), size)
        if mask.any():
            chosen.append(index)
            targets.append(finding)
            masks.append(mask)
    margin = MARGIN_AT_224 * max(size) / 224
    pointing: dict[str, float] = {}
    for method in methods_for(classifier.module):
        maps = []
        try:
            for start in range(0, len(chosen), classifier.batch_size):
                part = chosen[start : start + classifier.batch_size]
                batch = torch.from_numpy(np.stack([inputs[i] for i in part]))
                classes = targets[start : start + classifier.batch_size]
                maps.append(
                    gradcam(classifier.module, batch.to(classifier.device), classes, method)
                )
        except ValueError as error:
            log.warning("localisation: %s cannot explain this network: %s", method, error)
            pointing[method] = float("nan")
            continue
        pointing[method] = (
            float(mask_pointing_hits(np.concatenate(maps), np.stack(masks), margin).mean())
            if chosen
            else float("nan")
        )
    used = classifier.cam_method
    return {
        "pointing": pointing,
        "n_lesion": len(chosen),
        "margin_px": round(margin, 2),
        "method": used,
        "best": best_method(pointing, used) if chosen else used,
    }


def best_method(pointing: dict[str, float], used: str) -> str:
    """The method that pointed most often; `used` (the package's own) wins a tie, since a change
    of method should earn its place, and otherwise the first in `pointing`'s order."""
    scored = {method: value for method, value in pointing.items() if not np.isnan(value)}
    if not scored:
        return used
    return max(scored, key=lambda method: (scored[method], method == used))


def _true_finding(target: np.ndarray, findings: list[int]) -> int | None:
    """The class a test image is explained for: its label, or a multi-label row's first finding."""
    if target.ndim:
        present = [i for i in findings if target[i]]
        return present[0] if present else None
    return int(target) if int(target) in findings else None
