"""Deep ensembles: packages that differ only in their weights joined into one package.

The ensemble's temperature, thresholds and ``[metrics]`` are fitted and measured on the
members' averaged probabilities over labelled validation images, read and scored as
`dicomai evaluate` reads and scores them (and so as the daemon does): ``dicomai evaluate OUT
--data DIR --split val`` on the same images gives the same numbers. An ensemble that kept its
first member's temperature, thresholds and metrics had claimed a validation accuracy of 1.0
and scored 0.5 on test images.

torch is imported inside the functions: the CLI's other commands stay fast.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomai.errors import DatasetError, DicomaiError, ModelPackageError
from dicomai.models.manifest import MANIFEST_NAME, Manifest

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from dicomai.models.package import LoadedModel
    from dicomai.training.datasets import LabelledImages

    Log = Callable[[str], object]

# What the members of an ensemble must share: one input, one set of classes, one network
# (the daemon builds the network once from the manifest and fills it with each member's weights).
SHARED = ("architecture", "options", "input", "multi_label", "applies_to", "explanation")


@dataclass(frozen=True)
class Member:
    """A package joined into the ensemble: where it was, and its loaded network."""

    path: Path
    loaded: LoadedModel


def join_packages(
    out: Path,
    packages: tuple[Path, ...] | list[Path],
    *,
    name: str,
    version: str,
    data: Path,
    description: str = "",
    labels_csv: Path | None = None,
    split: str = "val",
    overwrite: bool = False,
    log: Log = print,
) -> Manifest:
    """Write the deep ensemble of `packages` into `out`, calibrated and measured on `data`.

    Parameters
    ----------
    out
        The ensemble's package folder: new or empty, unless `overwrite`.
    packages
        Two or more package folders (or run folders holding ``package/``) that differ only
        in their weights.
    name, version, description
        The ensemble's; an empty description names the members' first's.
    data, labels_csv, split
        The labelled validation images, as `dicomai evaluate` takes them.
    overwrite
        Replace the package in `out`.
    log
        Receives progress lines.

    Returns
    -------
    Manifest
        The manifest written.

    Raises
    ------
    DicomaiError
        Fewer than two packages, `out` not empty (without `overwrite`) or one of them; a
        missing or broken package; members that differ in more than their weights; a bad
        data layout (before anything is written).
    """
    from dicomai.models.package import refuse_occupied, write_ensemble_package

    if len(packages) < 2:
        raise DicomaiError(f"an ensemble joins two or more packages, got {len(packages)}")
    refuse_occupied(out, overwrite)
    members = [_load_member(path, log) for path in packages]
    if Path(out).resolve() in {member.path.resolve() for member in members}:
        raise DicomaiError(f"{out} is one of the packages to join: give another OUT")
    _require_same(members)
    # Copied before the classifier moves the networks to its memory layout.
    states = [
        {k: v.detach().clone() for k, v in member.loaded.module.state_dict().items()}
        for member in members
    ]
    first = members[0].loaded.manifest
    manifest = replace(
        first,
        name=name,
        version=version,
        description=description or _description(members),
        uncertainty=replace(first.uncertainty, method="ensemble"),
        ensemble=(),
    )
    fitted = _fit_on_validation(manifest, members, data, labels_csv, split, log)
    written = write_ensemble_package(out, fitted, states, overwrite=overwrite)
    metrics = written.metrics
    log(
        f"wrote {out}: {len(members)} members; validation AUC {metrics['val_auc_macro']:.3f}, "
        f"ECE {metrics['val_ece']:.3f}, temperature {written.temperature:.3f}"
    )
    return written


def _load_member(path: Path, log: Log) -> Member:
    """A package folder, or a run folder's ``package/``, loaded and its weights checked."""
    from dicomai.models.package import load_model

    path = Path(path)
    if not path.is_dir():
        raise DicomaiError(f"{path}: no such package folder")
    if not (path / MANIFEST_NAME).is_file() and (path / "package" / MANIFEST_NAME).is_file():
        path = path / "package"
    loaded = load_model(path)
    manifest = loaded.manifest
    if manifest.ensemble:
        raise ModelPackageError(
            f"{path}: already an ensemble ({len(manifest.ensemble) + 1} members): join the "
            "single packages instead"
        )
    log(f"member {path}: {manifest.name} {manifest.version} ({manifest.architecture})")
    return Member(path, loaded)


def _require_same(members: list[Member]) -> None:
    """Refuse members that differ in more than their weights, naming the first difference."""
    first = members[0]
    shared = _classes(first.loaded.manifest)
    shared |= {field: getattr(first.loaded.manifest, field) for field in SHARED}
    for member in members[1:]:
        manifest = member.loaded.manifest
        theirs = _classes(manifest)
        theirs |= {field: getattr(manifest, field) for field in SHARED}
        for field, value in shared.items():
            if theirs[field] != value:
                where, its, not_this = _first_difference(field, theirs[field], value)
                raise ModelPackageError(
                    f"{member.path} differs from {first.path} in more than its weights: "
                    f"{where} {_short(its)}, not {_short(not_this)}"
                )


def _first_difference(name: str, value: Any, other: Any) -> tuple[str, Any, Any]:
    """The first field of two settings objects (dataclasses or dicts) that differs, with its
    two values: ``input.size`` rather than two whole input specifications."""
    if is_dataclass(value) and type(value) is type(other):
        value, other = asdict(value), asdict(other)  # type: ignore[arg-type]
    if isinstance(value, dict) and isinstance(other, dict):
        for key in sorted(set(value) | set(other), key=str):
            if value.get(key) != other.get(key):
                return f"{name}.{key}", value.get(key), other.get(key)
    return name, value, other


def _classes(manifest: Manifest) -> dict[str, tuple[Any, ...]]:
    """The classes as the ensemble reports them; their thresholds are refitted, so not compared."""
    specs = manifest.classes
    return {
        "classes": tuple(spec.name for spec in specs),
        "codes": tuple(f"({spec.code.value}, {spec.code.scheme})" for spec in specs),
        "findings": tuple(spec.name for spec in specs if spec.is_finding),
    }


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _description(members: list[Member]) -> str:
    first = members[0].loaded.manifest
    base = f"Deep ensemble of {len(members)} {first.architecture} packages"
    return f"{base}; the first: {first.description}" if first.description else base


def _fit_on_validation(
    manifest: Manifest,
    members: list[Member],
    data: Path,
    labels_csv: Path | None,
    split: str,
    log: Log,
) -> Manifest:
    """`manifest` with the ensemble's temperature, thresholds, ``[metrics]`` and
    ``[training]``, from the images `dicomai evaluate` would read of `data` and score."""
    from dicomai.evaluation.report import _reported, _task
    from dicomai.inference.runner import Classifier
    from dicomai.models.package import LoadedModel
    from dicomai.training.package_writer import choose_thresholds, positive_class, rounded

    modules = tuple(member.loaded.module for member in members)
    loaded = LoadedModel(manifest=manifest, module=modules[0], members=modules)
    images, frames, left_out = _validation_inputs(loaded, data, labels_csv, split, log)
    logits = _member_logits(modules, frames, manifest)
    temperature = round(fit_ensemble_temperature(logits, images.targets, manifest.multi_label), 6)
    if not 0.05 < temperature < 20.0:
        log(
            f"warning: the temperature reached its bound ({temperature:g}): probabilities are "
            f"not calibrated; use a larger validation set ({len(images)} images)"
        )
    tempered = LoadedModel(replace(manifest, temperature=temperature), modules[0], modules)
    _, summary = _reported(Classifier(tempered), frames, log)
    task = _task(loaded)
    thresholds = choose_thresholds(
        summary.mean, images.targets, task, positive_class(manifest.classes)
    )
    specs = tuple(
        replace(spec, threshold=float(t))
        for spec, t in zip(manifest.classes, thresholds, strict=True)
    )
    used: dict[str, Any] = {"path": str(data), "labels": str(labels_csv or ""), "split": split}
    used |= {"n": len(images), "n_not_evaluated": len(left_out)}
    return replace(
        manifest,
        classes=specs,
        temperature=temperature,
        metrics=rounded(_validation_metrics(summary.mean, images.targets, task, specs)),
        training=rounded(_training_table(members, used)),
    )


def _validation_inputs(
    loaded: LoadedModel, data: Path, labels_csv: Path | None, split: str, log: Log
) -> tuple[LabelledImages, list[tuple[np.ndarray, ...]], list[dict[str, str]]]:
    """The labelled images of `data` that `dicomai evaluate` would score, their frames' model
    inputs, and those it would leave out (`dicomai.evaluation.report`)."""
    from dicomai.evaluation.report import _model_inputs
    from dicomai.training.datasets import load_evaluation_data

    manifest = loaded.manifest
    listed = load_evaluation_data(data, manifest.class_names, labels_csv, split, log=log)
    if (listed.targets.ndim == 2) != manifest.multi_label:
        raise DatasetError(
            f"{labels_csv or data}: the data give "
            f"{'several labels' if listed.targets.ndim == 2 else 'one label'} per image, but "
            f"the members are {'multi-label' if manifest.multi_label else 'single-label'}"
        )
    images, frames, left_out = _model_inputs(listed, loaded, labels_csv or data, log, log)
    log(f"validation: {len(images)} images of {data} ({split}), {len(left_out)} left out")
    return images, frames, left_out


def _member_logits(
    modules: tuple[Any, ...], frames: list[tuple[np.ndarray, ...]], manifest: Manifest
) -> np.ndarray:
    """Each member's logits of each image's reported frame, float64 (members, N, classes).

    The frame of a multi-frame image is chosen as the daemon chooses it (`reported_frame`),
    on the members' untempered mean; the temperature is fitted on those frames.
    """
    import numpy as np
    import torch

    from dicomai.inference.uncertainty import network_outputs, tempered_probabilities
    from dicomai.jobs.reading import reported_frame

    flat = [tensor for group in frames for tensor in group]
    every = []
    for module in modules:
        chunks = []
        for start in range(0, len(flat), 64):
            batch = torch.from_numpy(np.stack(flat[start : start + 64]))
            with torch.inference_mode():
                chunks.append(network_outputs(module.eval(), batch)[0].double())
        every.append(torch.cat(chunks))
    logits = torch.stack(every)
    mean = np.mean([tempered_probabilities(z, 1.0, manifest.multi_label) for z in logits], axis=0)
    rows, start = [], 0
    for group in frames:
        rows.append(start + reported_frame(mean[start : start + len(group)], manifest.classes))
        start += len(group)
    return logits[:, rows].numpy()


def fit_ensemble_temperature(logits: np.ndarray, targets: np.ndarray, multilabel: bool) -> float:
    """The temperature T minimising the validation NLL of the members' mean of softmax (or
    sigmoid per class) of logits / T: the probability the daemon reports of an ensemble, which
    applies one temperature to every member and then averages (with one member, what
    `dicomai.training.package_writer.calibrate` fits).

    Parameters
    ----------
    logits
        (members, N, classes) validation logits.
    targets
        (N,) true classes, or (N, classes) 0/1 labels if `multilabel`.
    multilabel
        Sigmoid per class in place of the softmax.

    Returns
    -------
    float
        T in [0.05, 20], as `calibrate` bounds it; 1.0 when there is nothing to fit on.
    """
    import math

    import numpy as np
    import torch

    if logits.shape[1] == 0:
        return 1.0
    scores = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    truth = torch.from_numpy(np.asarray(targets))
    count = math.log(scores.shape[0])
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = scores / log_t.exp()
        if multilabel:
            # log of the members' mean sigmoid, and of its complement, without underflow.
            present = torch.logsumexp(torch.nn.functional.logsigmoid(scaled), dim=0) - count
            absent = torch.logsumexp(torch.nn.functional.logsigmoid(-scaled), dim=0) - count
            labels = truth.double()
            loss = -(labels * present + (1 - labels) * absent).mean()
        else:
            mean = torch.logsumexp(torch.log_softmax(scaled, dim=2), dim=0) - count
            loss = torch.nn.functional.nll_loss(mean, truth.long())
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def _validation_metrics(
    probabilities: np.ndarray, targets: np.ndarray, task: Any, specs: tuple[Any, ...]
) -> dict[str, Any]:
    """The ``[metrics]`` table, as `dicomai train` writes it for one network."""
    import numpy as np

    from dicomai.evaluation.metrics import compute_metrics, finding_metrics, reported_present
    from dicomai.training.datasets import Task
    from dicomai.training.package_writer import positive_class
    from dicomai.training.runs import REPORTED_MACROS, _headline

    classes = tuple(spec.name for spec in specs)
    thresholds = np.array([spec.threshold for spec in specs])
    metrics = compute_metrics(
        probabilities, targets, task, classes, thresholds, positive_class(specs)
    )
    if task is Task.MULTICLASS:
        found = finding_metrics(
            reported_present(probabilities, specs),
            targets,
            classes,
            np.array([spec.is_finding for spec in specs], dtype=bool),
        )
        metrics |= {key: found[key] for key in REPORTED_MACROS}
    return _headline(metrics)


def _training_table(members: list[Member], data: dict[str, Any]) -> dict[str, Any]:
    """What the ensemble was made of and calibrated on; each member's own training is in its
    package."""
    import torch

    from dicomai.training.package_writer import code_version

    joined = []
    for member in members:
        manifest = member.loaded.manifest
        optimisation = manifest.training.get("optimisation")
        seed = optimisation.get("seed") if isinstance(optimisation, dict) else None
        joined.append(
            {
                "package": str(member.path),
                "name": manifest.name,
                "version": manifest.version,
                "weights_sha256": manifest.weights_sha256,
                **({"seed": seed} if seed is not None else {}),
            }
        )
    return {
        "ensemble_of": joined,
        "data": data,
        "code": code_version(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, cpu",
        "validation": (
            "temperature fitted and thresholds chosen (Youden's J) on the members' averaged "
            "probabilities over the validation images, scored as dicomai evaluate scores them"
        ),
    }
