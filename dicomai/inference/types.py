"""Values a model run produces: per-class scores, per-image predictions and heat maps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 Table 8.8-1): value, scheme designator and meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class ClassScore:
    """One class of the model for one image."""

    name: str
    code: Code
    probability: float
    threshold: float
    is_finding: bool
    uncertainty: float | None = None

    @property
    def positive(self) -> bool:
        return self.is_finding and self.probability >= self.threshold


@dataclass(frozen=True)
class UncertaintyEstimate:
    """How unsure the model was about one image, from several stochastic or member passes.

    `entropy` is the predictive entropy of the mean probabilities (nats): total uncertainty;
    `mutual_information` the part due to disagreement between passes (epistemic), the mean
    of the passes' own entropies subtracted from it.
    """

    method: str
    samples: int
    entropy: float
    mutual_information: float


@dataclass(frozen=True)
class ImagePrediction:
    """What the model said about one source image.

    `heatmap` is float32 in [0, 1] at the model's input resolution (rows, columns), for the
    `explained` class; None when the image was not evaluated. `extra_maps` holds further
    per-pixel outputs of a multi-task model at the same resolution, by name (a "segmentation"
    entry is the lesion probability in [0, 1], an "attention" entry a transformer's class-token
    attention scaled to [0, 1]); None for a classifier. With an uncertainty method in the
    package, each score's `uncertainty` is the standard deviation of its probability over the
    passes, `uncertainty` here that of the top finding (else of the predicted class), and
    `uncertainty_estimate` the image's entropies; all None without one.
    """

    sop_instance_uid: str
    evaluated: bool
    scores: tuple[ClassScore, ...] = ()
    predicted: str | None = None
    explained: str | None = None
    heatmap: np.ndarray | None = None
    reason: str | None = None
    extra_maps: dict[str, np.ndarray] | None = None
    uncertainty: float | None = None
    uncertainty_estimate: UncertaintyEstimate | None = None

    def score(self, name: str) -> ClassScore:
        for score in self.scores:
            if score.name == name:
                return score
        raise KeyError(name)

    @property
    def top_finding(self) -> ClassScore | None:
        """The finding the image is reported and explained for: the most probable of those
        Present, else the most probable finding. (A multi-label model's most probable finding
        can be Absent at its own threshold while a less probable one is Present: its map and
        overlay were drawn for the Absent one.)"""
        findings = [s for s in self.scores if s.is_finding]
        if not findings:
            return None
        present = [s for s in findings if s.positive]
        return max(present or findings, key=lambda s: s.probability)
