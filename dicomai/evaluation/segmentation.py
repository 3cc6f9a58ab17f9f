"""How well a network that also segments outlines the lesions of a test set with masks."""

from __future__ import annotations

import numpy as np
import torch

from dicomai.inference.runner import Classifier
from dicomai.inference.uncertainty import network_outputs
from dicomai.training.batches import resize_mask
from dicomai.training.datasets import LabelledImages, read_image01, read_mask
from dicomai.training.losses import dice_scores

SEGMENTATION = "segmentation"


def segments(classifier: Classifier) -> bool:
    """Whether the package's network gives a lesion mask besides its scores."""
    return hasattr(classifier.module, "forward_with_maps") and hasattr(
        classifier.module, "forward_multitask"
    )


def segmentation_metrics(
    classifier: Classifier, images: LabelledImages, inputs: list[np.ndarray]
) -> dict[str, float | int]:
    """Dice of the predicted masks (probability > 0.5) against the true ones, at model size.

    Parameters
    ----------
    classifier
        The package, as the daemon runs it (one deterministic pass).
    images
        The test set; its ``masks`` name each image's mask file (none: no lesion).
    inputs
        The images as the model sees them, in the order of `images`.

    Returns
    -------
    dict
        ``dice_mean`` and ``dice_median`` over the images with a lesion (NaN without one),
        ``n_lesion``, and ``empty_predicted_on_clear``: the fraction of images without a
        lesion whose predicted mask is empty too.

    Raises
    ------
    DatasetError
        If a mask file is unreadable or not the size of its image.
    """
    size = classifier.loaded.manifest.input.size
    truths = []
    for index, path in enumerate(images.paths):
        mask_path = images.mask_file(index)
        if mask_path is None:
            truths.append(np.zeros(size, np.uint8))
        else:
            truths.append(resize_mask(read_mask(mask_path, read_image01(path).shape), size))
    predicted = []
    module = classifier.module.eval()
    for start in range(0, len(inputs), classifier.batch_size):
        batch = torch.from_numpy(np.stack(inputs[start : start + classifier.batch_size]))
        with torch.inference_mode():
            _, maps = network_outputs(module, batch.to(classifier.device))
        predicted.append(maps[SEGMENTATION].float().cpu())
    probabilities = torch.cat(predicted)
    masks = torch.from_numpy(np.stack(truths)).float()
    # dice_scores thresholds logits at 0, i.e. probabilities at 0.5.
    dice = dice_scores(probabilities - 0.5, masks).numpy()
    lesion = masks.flatten(1).amax(dim=1).numpy() > 0
    clear = ~lesion
    found_nothing = (probabilities[clear] <= 0.5).flatten(1).all(dim=1).numpy()
    return {
        "dice_mean": float(np.mean(dice[lesion])) if lesion.any() else float("nan"),
        "dice_median": float(np.median(dice[lesion])) if lesion.any() else float("nan"),
        "n_lesion": int(lesion.sum()),
        "empty_predicted_on_clear": float(found_nothing.mean()) if clear.any() else float("nan"),
    }
