"""Calibration and uncertainty: temperature scaling, MC dropout, deep ensembles, their summary.

Temperature scaling (Guo et al., 2017) is fitted at training time on the validation set
(`fit_temperature`, kept with the trainer that fits it) and applied to every pass here. MC
dropout (Gal & Ghahramani, 2016) and deep ensembles (Lakshminarayanan et al., 2017) both give
several probability vectors per image; `summarize` turns them into the mean probability,
its per-class standard deviation, the predictive entropy and the mutual information.

Each pass also collects the network's extra per-pixel maps (a transformer's attention, a
multi-task model's segmentation) from the same forward pass (`network_outputs`), so that no
network runs a second time for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dicomai.training.trainer import fit_temperature

__all__ = [
    "Passes",
    "Summary",
    "dropout_layers",
    "ensemble_passes",
    "ensemble_probabilities",
    "fit_temperature",
    "mc_dropout_passes",
    "mc_dropout_probabilities",
    "network_outputs",
    "single_pass",
    "summarize",
    "tempered_probabilities",
]

Maps = dict[str, torch.Tensor]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class Summary:
    """Several passes over N images summarised; arrays float64.

    Attributes
    ----------
    mean
        (N, C) mean probabilities: the prediction.
    std
        (N, C) standard deviation of each probability over the passes (variance = std²).
    entropy
        (N,) entropy of `mean` in nats: total predictive uncertainty.
    mutual_information
        (N,) `entropy` minus the passes' mean entropy: their disagreement (epistemic).
    """

    mean: np.ndarray
    std: np.ndarray
    entropy: np.ndarray
    mutual_information: np.ndarray


def tempered_probabilities(
    logits: torch.Tensor, temperature: float, multi_label: bool = False
) -> np.ndarray:
    """softmax(logits / T), or sigmoid(logits / T) per class if `multi_label`, float64 (N, C)."""
    scaled = logits.double() / temperature
    if multi_label:
        return torch.sigmoid(scaled).cpu().numpy()
    return torch.softmax(scaled, dim=1).cpu().numpy()


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The model's dropout modules that drop something (p > 0)."""
    return [m for m in model.modules() if isinstance(m, _DROPOUT) and float(m.p) > 0.0]


@contextmanager
def _dropout_on(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm uses its running statistics) with the dropout layers sampling."""
    was_training = model.training
    model.eval()
    for layer in dropout_layers(model):
        layer.train()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Passes:
    """What S forward passes over N images gave.

    Attributes
    ----------
    probabilities
        float64 (S, N, C), tempered.
    maps
        The network's extra maps by name, each float32 (N, H, W) in [0, 1], averaged over the
        passes; empty for a network without them.
    """

    probabilities: np.ndarray
    maps: dict[str, np.ndarray]


def network_outputs(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, Maps]:
    """Logits and the network's extra maps (``forward_with_maps``) from one forward pass.

    A network without extra maps is simply called; its maps are ``{}``.
    """
    forward = getattr(model, "forward_with_maps", None)
    if forward is None:
        return model(batch), {}
    logits, maps = forward(batch)
    return logits, maps


def _collect(
    outputs: Iterable[tuple[torch.Tensor, Maps]], temperature: float, multi_label: bool
) -> Passes:
    samples: list[np.ndarray] = []
    sums: dict[str, torch.Tensor] = {}
    for logits, maps in outputs:
        samples.append(tempered_probabilities(logits, temperature, multi_label))
        for name, value in maps.items():
            sums[name] = sums[name] + value.float() if name in sums else value.float()
    count = max(1, len(samples))
    return Passes(
        probabilities=np.stack(samples),
        maps={
            name: (total / count).cpu().numpy().astype(np.float32) for name, total in sums.items()
        },
    )


def single_pass(
    model: nn.Module, batch: torch.Tensor, temperature: float = 1.0, multi_label: bool = False
) -> Passes:
    """One deterministic pass in eval mode: probabilities (1, N, C) and the extra maps."""
    model.eval()
    with torch.inference_mode():
        return _collect([network_outputs(model, batch)], temperature, multi_label)


def mc_dropout_passes(
    model: nn.Module,
    batch: torch.Tensor,
    passes: int,
    temperature: float = 1.0,
    seed: int = 0,
    multi_label: bool = False,
) -> Passes:
    """`passes` stochastic forward passes with dropout on, and their mean extra maps.

    Each image's passes are one batch of `passes` copies of it, its masks drawn after seeding
    with `seed`: an image gets the same numbers whatever else is in the batch, in whatever
    order, at whatever batch size (drawn across a batch, a borderline nodule was Present in
    one study and Absent in another). The random state is forked, the caller's left untouched.

    Parameters
    ----------
    model
        A network with at least one dropout layer (see `dropout_layers`).
    batch
        Inputs (N, 3, H, W) on the model's device.
    passes
        Number of passes, at least 1.
    temperature
        The package's calibration temperature, applied to every pass.
    seed
        Seed of the dropout masks.
    multi_label
        Sigmoid per class instead of a softmax over the classes.

    Returns
    -------
    Passes
        Probabilities float64 (passes, N, C) and the extra maps.

    Raises
    ------
    ValueError
        If the network has no dropout layer with p > 0: its passes would all agree.
    """
    if not dropout_layers(model):
        raise ValueError(f"MC dropout needs a dropout layer; {type(model).__name__} has none")
    devices = [batch.device] if batch.device.type == "cuda" else []
    count = max(1, passes)
    with torch.random.fork_rng(devices=devices), _dropout_on(model), torch.inference_mode():
        per_image = []
        for image in batch:
            torch.manual_seed(seed)
            copies = image.unsqueeze(0).expand(count, *image.shape).contiguous()
            per_image.append(network_outputs(model, copies))
    # Pass p of the batch: row p of every image's copies.
    outputs = [
        (
            torch.stack([logits[p] for logits, _ in per_image]),
            {
                name: torch.stack([maps[name][p] for _, maps in per_image])
                for name in per_image[0][1]
            },
        )
        for p in range(count)
    ]
    return _collect(outputs, temperature, multi_label)


def mc_dropout_probabilities(
    model: nn.Module, batch: torch.Tensor, passes: int, temperature: float = 1.0, seed: int = 0
) -> np.ndarray:
    """The probabilities, float64 (passes, N, C), of `mc_dropout_passes`."""
    return mc_dropout_passes(model, batch, passes, temperature, seed).probabilities


def ensemble_passes(
    members: Sequence[nn.Module],
    batch: torch.Tensor,
    temperature: float = 1.0,
    multi_label: bool = False,
) -> Passes:
    """One pass per member in eval mode: probabilities (members, N, C), mean extra maps."""
    with torch.inference_mode():
        outputs = []
        for member in members:
            member.eval()
            outputs.append(network_outputs(member, batch))
        return _collect(outputs, temperature, multi_label)


def ensemble_probabilities(
    members: Sequence[nn.Module], batch: torch.Tensor, temperature: float = 1.0
) -> np.ndarray:
    """Each member's tempered probabilities, float64 (members, N, C), members in eval mode."""
    return ensemble_passes(members, batch, temperature).probabilities


def summarize(samples: np.ndarray) -> Summary:
    """Mean, per-class spread, predictive entropy and mutual information of (S, N, C) samples."""
    mean = samples.mean(axis=0)
    entropy = _entropy(mean)
    expected = _entropy(samples).mean(axis=0)
    return Summary(
        mean=mean,
        std=samples.std(axis=0),
        entropy=entropy,
        mutual_information=np.clip(entropy - expected, 0.0, None),
    )


def _entropy(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(probabilities, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)
