"""A `dicomai train` run: data checked, network trained, calibrated and written as a package.

The output folder holds ``package/`` (what `dicomai models register` takes), ``training_log.csv``
(one row per epoch), ``curves.png`` and ``checkpoints/`` (``last.pt`` for ``--resume``,
``best.pt``).

A network that also segments (one with ``forward_multitask``, e.g. ``resnet50_multitask``) trains
with the multitask loss on the data's lesion masks, unless told to train its classification only
(`RunSettings.masks` False); with masks, the validation Dice joins the metrics.

A folder that already holds a run is refused, unless the run continues it (``resume``) or is
told to replace it (``overwrite``): a second run had replaced a registered package's weights
under the same name and version without a word.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dicomai.errors import DatasetError, ModelPackageError, TrainingError
from dicomai.evaluation.metrics import compute_metrics, finding_metrics, reported_present
from dicomai.evaluation.plots import plot_history
from dicomai.explain.gradcam import methods_for
from dicomai.imaging.spec import InputSpec
from dicomai.inference.uncertainty import dropout_layers, mc_dropout_passes, summarize
from dicomai.models.architectures import build
from dicomai.models.initial import load_initial_weights
from dicomai.models.manifest import AppliesTo, Manifest, UncertaintySpec
from dicomai.models.package import write_package
from dicomai.training.augment import Augmentation
from dicomai.training.batches import ImageDataset
from dicomai.training.datasets import Task, TrainingData, load_training_data, require_masks
from dicomai.training.fit import (
    FitResult,
    FitSettings,
    Log,
    fit,
    predict_logits,
    resolve_device,
)
from dicomai.training.fit import to_probabilities as probabilities_of
from dicomai.training.objectives import LossSettings, build_objective
from dicomai.training.package_writer import (
    calibrate,
    choose_thresholds,
    class_specs,
    code_version,
    positive_class,
    read_codes,
    rounded,
)
from dicomai.training.strategies import StrategySettings, plan

# The losses that apply label smoothing (`dicomai.training.objectives`).
SMOOTHED = ("ce", "multitask")
# A multi-class model's findings as its SR reports them (`finding_metrics`).
REPORTED_MACROS = ("sensitivity_macro", "specificity_macro", "ppv_macro", "npv_macro")


@dataclass(frozen=True)
class RunSettings:
    """Everything `dicomai train` takes."""

    data: Path
    out: Path
    name: str
    version: str = "1.0.0"
    labels_csv: Path | None = None
    val_fraction: float = 0.2
    architecture: str = "tinycnn"
    options: dict[str, Any] = field(default_factory=dict)
    spec: InputSpec = field(default_factory=InputSpec)
    initial_weights: Path | None = None
    initial_kind: str = "torchvision"
    strategy: StrategySettings = field(default_factory=StrategySettings)
    loss: LossSettings = field(default_factory=LossSettings)
    fit: FitSettings = field(default_factory=FitSettings)
    augmentation: Augmentation = field(default_factory=Augmentation)
    codes_csv: Path | None = None
    applies_to: AppliesTo = field(default_factory=AppliesTo)
    description: str = ""
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    masks: bool = True
    explanation: str = ""
    uncertainty: UncertaintySpec = field(default_factory=UncertaintySpec)


def train_package(settings: RunSettings, log: Log = print) -> Manifest:
    """Run `settings` end to end and return the manifest written to ``out/package``.

    Raises
    ------
    TrainingError
        If `settings.out` already holds a run and neither `resume` nor `overwrite` is set
        (before anything is read or written).
    DatasetError
        On a bad data layout or CSV (before training), a segmenting network without masks
        (unless `settings.masks` is False), a positive image without its mask, or a resume that
        does not match.
    ModelPackageError
        On an unknown architecture or option, or an explanation method that cannot explain
        the network (relevance of a CNN), before training.
    """
    previous = check_output_folder(settings.out, settings.resume, settings.overwrite)
    data = load_training_data(
        settings.data, settings.labels_csv, settings.val_fraction, settings.fit.seed
    )
    codes = read_codes(settings.codes_csv)
    multilabel = data.task is Task.MULTILABEL
    torch.manual_seed(settings.fit.seed)
    model = build(settings.architecture, len(data.classes), **settings.options)
    if settings.explanation and settings.explanation not in methods_for(model):
        raise ModelPackageError(
            f"explanation: {settings.explanation} cannot explain {settings.architecture} "
            f"(it takes {', '.join(methods_for(model))})"
        )
    _takes_inputs(model, settings)
    if settings.uncertainty.method == "mc_dropout" and not dropout_layers(model):
        raise TrainingError(
            f"MC dropout needs dropout in the network: {settings.architecture} has none as "
            "configured; give --dropout P"
        )
    provisional = class_specs(data.classes, np.full(len(data.classes), 0.5), codes)
    findings = [spec.is_finding for spec in provisional]
    masks = _uses_masks(settings, data, hasattr(model, "forward_multitask"), findings, log)
    settings = replace(settings, masks=masks, loss=_resolve_loss(settings, multilabel, masks))
    objective = build_objective(settings.loss, data.train.targets, multilabel)
    if settings.initial_weights is not None:
        loaded = load_initial_weights(model, settings.initial_weights, settings.initial_kind)  # type: ignore[arg-type]
        log(f"initial weights: {len(loaded)} tensors from {settings.initial_weights}")
    phases = plan(model, settings.strategy, settings.fit.epochs)
    log(
        f"{data.task.value}: {len(data.classes)} classes, {len(data.train)} training and "
        f"{len(data.val)} validation images; strategy {settings.strategy.strategy.value}"
    )
    device = resolve_device(settings.device)
    train = ImageDataset(
        data.train, settings.spec, settings.augmentation, settings.fit.seed, masks=masks
    )
    val = ImageDataset(data.val, settings.spec, masks=masks)
    for path in previous:
        # --overwrite: the old run goes as the new one starts, never mixed with it.
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    result = fit(
        model,
        train,
        val,
        objective,
        phases,
        settings.fit,
        task=data.task,
        classes=data.classes,
        checkpoint_dir=settings.out / "checkpoints",
        device=device,
        fingerprint=_fingerprint(settings, data),
        resume=settings.resume,
        log=log,
        history_file=settings.out / HISTORY,
    )
    logits, targets = predict_logits(model, val, device)
    # Rounded as the manifest keeps it, so that the probabilities below are the daemon's.
    temperature = round(calibrate(logits, targets, multilabel), 6)
    if not 0.05 < temperature < 20.0:
        # At its bound the fit did not converge: the validation set is too small or of one
        # outcome, and the probabilities the package reports are not calibrated.
        log(
            f"warning: the temperature reached its bound ({temperature:g}): probabilities are "
            f"not calibrated; use a larger validation set ({len(data.val)} images)"
        )
    probabilities = _reported_probabilities(
        model, val, logits, temperature, settings.uncertainty, multilabel, device
    )
    thresholds = choose_thresholds(probabilities, targets, data.task, positive_class(provisional))
    specs = class_specs(data.classes, thresholds, codes)
    metrics = compute_metrics(
        probabilities, targets, data.task, data.classes, thresholds, positive_class(specs)
    )
    if data.task is Task.MULTICLASS:
        # What the daemon's SR reports (each finding at its own threshold), for the gate to
        # hold against a site evaluation's: the accuracy above is the most probable class's.
        found = finding_metrics(
            reported_present(probabilities, specs),
            targets,
            data.classes,
            np.array([spec.is_finding for spec in specs], dtype=bool),
        )
        metrics |= {key: found[key] for key in REPORTED_MACROS}
    if masks:
        # The best epoch's row was measured on the very weights the package holds.
        metrics["dice"] = result.history[result.best_epoch - 1]["val_dice"]
    manifest = Manifest(
        name=settings.name,
        version=settings.version,
        architecture=settings.architecture,
        classes=specs,
        options=settings.options,
        description=settings.description,
        input=settings.spec,
        temperature=temperature,
        applies_to=settings.applies_to,
        training=rounded(_training_table(settings, data, result, device)),
        metrics=rounded(_headline(metrics)),
        multi_label=multilabel,
        explanation=settings.explanation,
        uncertainty=settings.uncertainty,
    )
    # check_output_folder let a run into an `out` with a package only to continue it
    # (--overwrite has removed the old one by now): a resumed run's package replaces its own.
    written = write_package(
        settings.out / "package", manifest, model.cpu().state_dict(), overwrite=settings.resume
    )
    plot_history(settings.out / "curves.png", result.history)
    dice = f", Dice {metrics['dice']:.3f}" if masks else ""
    log(
        f"wrote {settings.out / 'package'}: best epoch {result.best_epoch}, validation "
        f"AUC {metrics['auc_macro']:.3f}, accuracy {metrics['accuracy']:.3f}, "
        f"ECE {metrics['ece']:.3f}, temperature {temperature:.3f}{dice}"
    )
    return written


def _reported_probabilities(
    model: nn.Module,
    val: ImageDataset,
    logits: np.ndarray,
    temperature: float,
    uncertainty: UncertaintySpec,
    multilabel: bool,
    device: torch.device,
) -> np.ndarray:
    """The validation probabilities (N, C) the daemon reports, for the thresholds and metrics.

    One deterministic pass (`logits`, tempered), or with MC dropout the mean of the package's
    passes, temperature and seed (`dicomai.inference.runner.Classifier`): the daemon decides
    on that mean, which pulls a finding's probability toward the prior, and thresholds chosen
    on the deterministic pass had left validated nodules Absent.
    """
    if uncertainty.method != "mc_dropout":
        return probabilities_of(logits, multilabel, temperature)
    means = []
    for inputs, *_ in DataLoader(val, batch_size=64):
        passes = mc_dropout_passes(
            model, inputs.to(device), uncertainty.passes, temperature, uncertainty.seed, multilabel
        )
        means.append(summarize(passes.probabilities).mean)
    return np.concatenate(means)


HISTORY = "training_log.csv"
# What a run writes into its folder (`train_package`); any of them there means a run was.
RUN_OUTPUTS = ("package", "checkpoints", HISTORY, "curves.png")


def check_output_folder(out: Path, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse an output folder that holds a run, unless it is to be continued or replaced.

    Parameters
    ----------
    out
        The run's folder.
    resume, overwrite
        Continue the run there; replace it.

    Returns
    -------
    list[Path]
        With `overwrite`, the previous run's outputs, for the caller to remove when the new
        run starts; else empty.

    Raises
    ------
    TrainingError
        If `out` holds a run and neither flag is given, or both are.
    """
    found = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if resume and overwrite:
        raise TrainingError(
            "--resume continues the run in --out, --overwrite replaces it: not both"
        )
    if not found or resume:
        return []
    if overwrite:
        return found
    names = ", ".join(path.name for path in found)
    raise TrainingError(
        f"{out} already holds a training run ({names}): give --resume to continue it, "
        "--overwrite to replace it, or another --out"
    )


def _takes_inputs(model: nn.Module, settings: RunSettings) -> None:
    """One forward pass of a blank batch, so that an input size the network cannot take stops
    the run in one line before training (a 4x4 input left a ResNet's map empty, a ViT built
    for 224² asserted on 32²: tracebacks at the first batch)."""
    rows, cols = settings.spec.size
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(2, 3, rows, cols))
    except (RuntimeError, AssertionError, ValueError) as exc:
        hint = ""
        if settings.architecture.startswith("vit"):
            hint = f" (give --option image_size={rows})"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TrainingError(
            f"{settings.architecture} cannot take {rows}x{cols} inputs: {first}{hint}"
        ) from None
    finally:
        model.train(was_training)


def _uses_masks(
    settings: RunSettings, data: TrainingData, segments: bool, findings: list[bool], log: Log
) -> bool:
    """Whether to train on lesion masks: only a network that segments does, given masks."""
    if not segments:
        if data.has_masks:
            log(f"lesion masks: not used ({settings.architecture} does not segment)")
        return False
    if not settings.masks:
        log(f"--no-masks: training the classification of {settings.architecture} only")
        return False
    if not data.has_masks:
        raise DatasetError(
            f"{settings.architecture} also segments lesions, but {settings.data} has no masks "
            "(masks/ folder or a mask column); give them, or --no-masks to train its "
            "classification only"
        )
    require_masks(data, findings)
    return True


def _resolve_loss(settings: RunSettings, multilabel: bool, masks: bool) -> LossSettings:
    """``auto`` made concrete; the multitask loss exactly when training on masks."""
    loss = settings.loss
    if loss.name == "auto":
        return replace(loss, name="multitask" if masks else "bce" if multilabel else "ce")
    if masks and loss.name != "multitask":
        raise DatasetError(
            f"loss {loss.name} ignores the lesion masks: use --loss multitask, or --no-masks"
        )
    if not masks and loss.name == "multitask":
        raise DatasetError("loss multitask needs a network that segments, trained on masks")
    return loss


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The validation metrics the manifest keeps: numbers and per-class AUCs and thresholds."""
    keys = (
        "accuracy", "auc_macro", "auc_micro", "f1_macro", "ece", "mce", "brier", "dice",
        *REPORTED_MACROS,
    )  # fmt: skip
    binary = ("sensitivity", "specificity", "ppv", "npv")
    headline = {f"val_{key}": metrics[key] for key in (*keys, *binary) if key in metrics}
    headline["val_n"] = metrics["n"]
    headline["val_auc_per_class"] = {
        name: values["auc"] for name, values in metrics["per_class"].items()
    }
    return headline


def _training_table(
    settings: RunSettings, data: TrainingData, result: FitResult, device: torch.device
) -> dict[str, Any]:
    strategy = asdict(settings.strategy)
    strategy["strategy"] = settings.strategy.strategy.value
    strategy["unfreeze_at"] = list(settings.strategy.unfreeze_at)
    strategy["lld_unit"] = str(settings.strategy.lld_unit)
    strategy["lld_rates"] = list(settings.strategy.lld_rates)
    loss = asdict(settings.loss)
    if settings.loss.name != "multitask":
        del loss["multitask_alpha"]
    if settings.loss.name not in SMOOTHED:
        # Focal and BCE ignore it: a focal run had recorded the default 0.1 it never applied.
        del loss["label_smoothing"]
    return {
        "data": data.summary(),
        "strategy": strategy,
        "loss": loss,
        # What ran: AMP is CUDA's only; a CPU run had recorded amp = true.
        "optimisation": settings.fit.to_dict() | {"amp": _uses_amp(settings.fit, device)},
        "augmentation": settings.augmentation.to_dict(),
        "initial_weights": str(settings.initial_weights or "none (random)"),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "phases_run": max((int(row["phase"]) for row in result.history), default=0),
        "stopped_early": result.stopped_early,
        "seconds": result.seconds,
        "code": code_version(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {resolve_device(settings.device)}",
        "validation": _validation_note(settings.uncertainty),
    }


def _validation_note(uncertainty: UncertaintySpec) -> str:
    note = "temperature fitted and thresholds chosen (Youden's J) on validation"
    if uncertainty.method != "mc_dropout":
        return note
    return (
        f"{note}; the temperature on the deterministic pass, the thresholds and metrics on the "
        f"mean of the {uncertainty.passes} MC-dropout passes"
    )


def _uses_amp(fit_settings: FitSettings, device: torch.device) -> bool:
    return fit_settings.amp and device.type == "cuda"


# Settings fields added after checkpoints were written, left out of a fingerprint while at
# these defaults: a run interrupted before an upgrade resumes after it (an added `lld_rates`
# had refused every earlier checkpoint).
_ADDED_LATER: dict[str, Any] = {"lld_rates": ()}


def _fields(settings: Any) -> dict[str, str]:
    """A settings dataclass field by field (reprs), so a refused resume names the field."""
    return {
        name: repr(value)
        for name, value in vars(settings).items()
        if not (name in _ADDED_LATER and value == _ADDED_LATER[name])
    }


def _fingerprint(settings: RunSettings, data: TrainingData) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one."""
    return {
        "architecture": settings.architecture,
        "options": {key: repr(value) for key, value in sorted(settings.options.items())},
        "spec": {key: repr(value) for key, value in settings.spec.to_dict().items()},
        "strategy": _fields(settings.strategy),
        "loss": _fields(settings.loss),
        "fit": _fields(settings.fit),
        "augmentation": _fields(settings.augmentation),
        "masks": settings.masks,
        "classes": list(data.classes),
        "train": [str(p) for p in data.train.paths[:1000]],
        "n_train": len(data.train),
        "checksum": float(np.asarray(data.train.targets, dtype=np.float64).sum()),
    }
