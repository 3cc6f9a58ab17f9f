"""Running a loaded model package on preprocessed images: calibrated scores, uncertainty, maps."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dicomai.errors import ModelPackageError
from dicomai.explain.gradcam import default_method, explain_top_finding, gradcam, methods_for
from dicomai.inference.precision import Precision, autocast, autocast_dtype
from dicomai.inference.types import ClassScore, ImagePrediction, UncertaintyEstimate
from dicomai.inference.uncertainty import (
    Passes,
    Summary,
    dropout_layers,
    ensemble_passes,
    mc_dropout_passes,
    single_pass,
    summarize,
    tempered_probabilities,
)
from dicomai.models.package import LoadedModel

log = logging.getLogger(__name__)


def cpu_threads() -> int:
    """The cores this process may run on (its affinity, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Classifier:
    """Classifies and explains images with one model package.

    Building one runs a warm-up pass (see `warm_up`), so that the first study does not pay
    for the device's first calls, and a model that cannot run fails here rather than on a
    patient's study.

    Parameters
    ----------
    loaded
        The package, as `dicomai.models.package.load_model` returns it.
    device
        Torch device to run on, e.g. ``"cpu"`` or ``"cuda:0"``; the network is moved there.
    batch_size
        Most images per forward pass; bounds memory on large studies.
    cam_method
        The heat-map method (see `dicomai.explain.gradcam.METHODS`); by default the package's
        ``explanation``, else the architecture's (`dicomai.explain.default_method`).
    precision
        The number format of the forward passes (see `dicomai.inference.precision`);
        scores and maps come out in fp32 and fp64 whatever it is.

    Raises
    ------
    ModelPackageError
        If the package asks for MC dropout of a network without dropout, or for a heat-map
        method that cannot explain its network (relevance of a CNN).
    ConfigError
        For a precision the device cannot run.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        cam_method: str | None = None,
        precision: Precision = "auto",
    ) -> None:
        self.loaded = loaded
        self.device = torch.device(device)
        self.batch_size = max(1, batch_size)
        self.autocast_dtype = autocast_dtype(precision, self.device)
        self._memory_format = torch.contiguous_format
        if self.device.type == "cpu":
            # One intra-op thread per core this process may run on (its affinity, which a
            # container or systemd's CPUAffinity narrows), not per core the machine has.
            torch.set_num_threads(cpu_threads())
        if self.device.type in ("cpu", "cuda"):
            # channels_last: resnet50 batch 8 514 ms vs 608-725 ms, densenet121 364 vs
            # 480-505 ms on 2 cores (FACTS.md); on a GPU the layout its tensor cores read
            # under autocast.
            self._memory_format = torch.channels_last
        members = loaded.members or (loaded.module,)
        self.members = [self._placed(member) for member in members]
        self.module = self.members[0]
        manifest = loaded.manifest
        self._uncertainty = manifest.uncertainty
        if self._uncertainty.method == "mc_dropout" and not dropout_layers(self.module):
            raise ModelPackageError(
                f"uncertainty.method: mc_dropout needs dropout, and {manifest.architecture} "
                f"with options {manifest.options} has none"
            )
        self.cam_method = cam_method or manifest.explanation or default_method(self.module)
        if self.cam_method not in methods_for(self.module):
            raise ModelPackageError(
                f"explanation: {self.cam_method} cannot explain {manifest.architecture} "
                f"(it takes {', '.join(methods_for(self.module))})"
            )
        self._findings = [i for i, spec in enumerate(manifest.classes) if spec.is_finding]
        # Scores and heat maps from one pass with gradients where a single deterministic pass
        # scores the image and the explained class (the top finding) follows from its logits;
        # uncertainty methods need several passes, and networks with extra maps their own.
        self._one_pass = (
            bool(self._findings)
            and self._uncertainty.method not in ("mc_dropout", "ensemble")
            and not hasattr(self.module, "forward_with_maps")
        )
        self.warm_up()

    def warm_up(self) -> None:
        """Classify and explain an image of zeros once, as `predict` does, and log how long
        it took.

        The first call on a device pays for its lazy set-up (allocator, kernel loading,
        cuDNN and cuBLAS handles, thread pools); paid at build it is not paid by the first
        study. On a GPU the batch is `batch_size` images, the most a study's pass holds,
        so weights and activations that do not fit in its memory fail here; on the CPU
        one image, where the first call costs little more than the next. The network is
        left as it was: in eval mode (no BatchNorm statistics move), its gradients
        cleared by the heat-map pass, the random state of MC dropout forked.
        """
        rows, cols = self.loaded.manifest.input.size
        images = 1 if self.device.type == "cpu" else self.batch_size
        zeros = np.zeros((3, rows, cols), dtype=np.float32)
        start = time.perf_counter()
        self.predict([("warm-up", zeros)] * images)
        manifest = self.loaded.manifest
        log.info(
            "model %s %s warmed up on %s with %d image(s) in %.2f s",
            manifest.name,
            manifest.version,
            self.device,
            images,
            time.perf_counter() - start,
        )

    def _placed(self, module: nn.Module) -> nn.Module:
        return module.to(self.device).to(memory_format=self._memory_format).eval()

    def predict(self, inputs: Sequence[tuple[str, np.ndarray]]) -> list[ImagePrediction]:
        """Classify images and explain each one's top finding (its most probable Present
        finding, else its most probable).

        Parameters
        ----------
        inputs
            ``(sop_instance_uid, image)`` pairs; each image float32 (3, H, W), preprocessed
            with the package's input specification.

        Returns
        -------
        list[ImagePrediction]
            One per input, in order: a score per class (softmax of logits divided by the
            manifest's temperature; with an uncertainty method, the mean over its passes and
            each score's spread), the most probable class, the package's heat map (float32
            (H, W) in [0, 1]) of the top finding class (an ensemble's members'
            maps averaged), and the network's extra maps (a multi-task model's segmentation,
            a transformer's attention) where it has them, taken from the same forward passes
            as the scores (averaged over an uncertainty method's passes).
        """
        predictions: list[ImagePrediction] = []
        with autocast(self.device, self.autocast_dtype):
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
        heatmaps: np.ndarray | list[None] = [None] * len(inputs)
        if self._one_pass:
            heatmaps, logits = explain_top_finding(
                self.module, batch, self._findings, method=self.cam_method, choose=self._choose
            )
            manifest = self.loaded.manifest
            probabilities = tempered_probabilities(
                logits, manifest.temperature, manifest.multi_label
            )
            passes = Passes(probabilities[np.newaxis], {})
        else:
            passes = self._passes(batch)
        summary = summarize(passes.probabilities)
        explained = self._explained_classes(summary.mean)
        if explained and not self._one_pass:
            heatmaps = self._heatmaps(batch, explained)
        extra = passes.maps
        return [
            self._prediction(
                uid,
                summary,
                i,
                explained[i] if explained else None,
                heatmaps[i],
                {name: maps[i] for name, maps in extra.items()} or None,
            )
            for i, (uid, _) in enumerate(inputs)
        ]

    def _prediction(
        self,
        uid: str,
        summary: Summary,
        i: int,
        explained: int | None,
        heatmap: np.ndarray | None,
        extra_maps: dict[str, np.ndarray] | None,
    ) -> ImagePrediction:
        classes = self.loaded.manifest.classes
        row = summary.mean[i]
        spread = summary.std[i] if self._samples > 1 else [None] * len(classes)
        scores = tuple(
            ClassScore(
                spec.name,
                spec.code,
                float(p),
                spec.threshold,
                spec.is_finding,
                None if sd is None else float(sd),
            )
            for spec, p, sd in zip(classes, row, spread, strict=True)
        )
        prediction = ImagePrediction(
            sop_instance_uid=uid,
            evaluated=True,
            scores=scores,
            predicted=classes[int(np.argmax(row))].name,
            explained=classes[explained].name if explained is not None else None,
            heatmap=heatmap,
            extra_maps=extra_maps,
        )
        if self._samples == 1:
            return prediction
        top = prediction.top_finding or prediction.score(str(prediction.predicted))
        estimate = UncertaintyEstimate(
            method=self._uncertainty.method,
            samples=self._samples,
            entropy=float(summary.entropy[i]),
            mutual_information=float(summary.mutual_information[i]),
        )
        return dataclasses.replace(
            prediction, uncertainty=top.uncertainty, uncertainty_estimate=estimate
        )

    @property
    def _samples(self) -> int:
        method = self._uncertainty.method
        if method == "mc_dropout":
            return self._uncertainty.passes
        return len(self.members) if method == "ensemble" else 1

    def _passes(self, batch: torch.Tensor) -> Passes:
        """The passes the uncertainty method asks for; each gives logits and extra maps at once."""
        manifest = self.loaded.manifest
        temperature, multi_label = manifest.temperature, manifest.multi_label
        method = self._uncertainty.method
        if method == "mc_dropout":
            return mc_dropout_passes(
                self.module,
                batch,
                self._uncertainty.passes,
                temperature,
                self._uncertainty.seed,
                multi_label,
            )
        if method == "ensemble":
            return ensemble_passes(self.members, batch, temperature, multi_label)
        return single_pass(self.module, batch, temperature, multi_label)

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Calibrated class probabilities as `predict` scores them, float64 (N, classes): one
        deterministic pass, or the mean of the package's MC-dropout passes or ensemble members,
        so that `dicomai evaluate` measures the model that runs."""
        return self.summary(batch).mean

    def summary(self, batch: torch.Tensor) -> Summary:
        """`probabilities` with the spread, entropy and mutual information of the passes (one
        pass: no spread), as `predict` computes its uncertainty."""
        if self._samples > 1:
            with autocast(self.device, self.autocast_dtype):
                return summarize(self._passes(batch).probabilities)
        with torch.inference_mode(), autocast(self.device, self.autocast_dtype):
            logits = self.module(batch)
        manifest = self.loaded.manifest
        return summarize(
            tempered_probabilities(logits, manifest.temperature, manifest.multi_label)[None]
        )

    @property
    def samples(self) -> int:
        """Passes per image: MC-dropout passes, ensemble members, or 1."""
        return self._samples

    def _heatmaps(self, batch: torch.Tensor, explained: list[int]) -> np.ndarray:
        """The heat map of each image's explained class; an ensemble's maps averaged, rescaled."""
        networks = self.members if self._uncertainty.method == "ensemble" else [self.module]
        maps = np.mean(
            [gradcam(net, batch, explained, method=self.cam_method) for net in networks], axis=0
        )
        if len(networks) > 1:
            peaks = maps.reshape(len(maps), -1).max(axis=1)
            maps = maps / np.where(peaks > 0, peaks, 1.0)[:, None, None]
        return maps.astype(np.float32)

    def _explained_classes(self, probabilities: np.ndarray) -> list[int]:
        """Per image, the finding to explain (`ImagePrediction.top_finding`'s rule: the most
        probable Present finding, else the most probable); none without findings."""
        if not self._findings:
            return []
        return [self._top_finding(row) for row in probabilities]

    def _top_finding(self, probabilities: np.ndarray) -> int:
        classes = self.loaded.manifest.classes
        present = [c for c in self._findings if float(probabilities[c]) >= classes[c].threshold]
        return max(present or self._findings, key=lambda c: float(probabilities[c]))

    def _choose(self, logits: torch.Tensor) -> int:
        """`_top_finding` of one image's logits, for the one-pass heat map's target."""
        manifest = self.loaded.manifest
        return self._top_finding(
            tempered_probabilities(logits[None], manifest.temperature, manifest.multi_label)[0]
        )
