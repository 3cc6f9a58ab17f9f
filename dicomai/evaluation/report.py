"""`dicomai evaluate`: a package run on labelled images as the daemon runs it, and the report.

The output folder must not be the package's (or inside it), and must be new, empty or hold
only the outputs below of an earlier evaluation without its ``evaluation.json``: a folder with
other files, or with an earlier report, is refused unless asked to ``overwrite``, so that a
report is never replaced, or mixed among other files, unawares. On sets of
`PROGRESS_FROM` images or more, reading and scoring them are reported at each tenth. Writes
into the output folder:

- ``evaluation.json``: every number, with this schema (floats; NaN where undefined, e.g. the
  AUC of a class without positives)::

      model            {name, version, architecture, weights_sha256, temperature}
      data             {path, n (the images evaluated, which every number below is of), task
                       ("binary" | "multiclass" | "multilabel"), per_class counts,
                       n_not_evaluated, not_evaluated [{file, reason}]: the images the daemon
                       would not evaluate (blank, too small for the model, pixel data that
                       cannot be decoded...), left out of every number}
      task, n
      decision         which rule decided (below)
      accuracy         binary and multi-label (exact-match accuracy for multi-label)
      precision_macro, recall_macro, f1_macro, precision_weighted, recall_weighted, f1_weighted
                       binary and multi-label
      auc_micro, auc_macro
      sensitivity, specificity, ppv, npv     binary only, for the positive (finding) class
                                             at its manifest threshold
      ece, mce         10 equal-width bins; reliability: [{lower, upper, confidence, accuracy,
                       count}]
      brier            scikit-learn's brier_score_loss (binary: positive class; multi-class:
                       sum over classes; multi-label: mean over classes)
      per_class        {name: {precision, recall, f1, support, auc, threshold}}
      confusion_matrix rows true, columns predicted; multi-label: per class [[TN, FP], [FN, TP]]

  Binary and multi-label decisions are "probability >= class threshold", which is the daemon's
  rule. A multi-class daemon reports each *finding* class Present when its probability reaches
  that class's own threshold (`ClassScore.positive`): an image can have several findings
  Present, or none, and non-finding classes are never reported. So multi-class reports what
  the SR says, per finding class one against the rest, in place of the keys above:

      sensitivity_macro, specificity_macro, ppv_macro, npv_macro
                       means over the finding classes (where defined)
      per_class        {name: {support, auc, threshold, is_finding, and for findings only:
                       sensitivity, specificity, ppv, npv, f1}}
      confusion_matrix {finding name: [[TN, FP], [FN, TP]]} of its Present/Absent
      accuracy_argmax, confusion_matrix_argmax
                       the most probable class against the truth (rows true, columns
                       predicted): what the daemon does not report, kept for comparison
      uncertainty      {method, samples (passes per image), answers (images; multi-label:
                       image-class pairs), errors (multi-class: images on which a finding the
                       SR reports Present or Absent is wrong), measures {entropy, and with
                       samples > 1 std
                       (of the predicted class: multi-class, the most probable) and
                       mutual_information (single-label): {auroc
                       (of the measure as a detector of errors), aurc (area under the risk-
                       coverage curve, lower is better), spearman (rho with the errors),
                       risk_at_coverage {"0.5", "0.8", "0.9", "1": error rate among the
                       answers least uncertain}}}}
      segmentation     only for a network that segments, on data with lesion masks:
                       {dice_mean, dice_median (images with a lesion; mask probability > 0.5,
                       at the model's input size), n_lesion, empty_predicted_on_clear}
      localisation     only on data with lesion masks: {pointing {method: fraction of the
                       images with a lesion whose heat map's maximum lies on the lesion or
                       within margin_px of it}, n_lesion, margin_px, method (the package's),
                       best (the method that pointed most often; the package's on a tie)}

- ``predictions.csv``: per image its file, truth, decision (``predicted``; multi-class:
  ``present``, the findings the SR calls Present joined by ``|``, and ``argmax``) and every
  class's probability;
- ``roc.png``, ``reliability.png``, ``risk_coverage.png`` (the error rate among the answers
  the model is surest of, by share kept), ``misclassified.png`` (up to 16, with their heat maps);
- ``report.md`` and ``report.html``: the same numbers for people.
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomai.errors import DatasetError, DicomaiError, NotEvaluable
from dicomai.evaluation.localisation import LOCALISATION, localisation_metrics
from dicomai.evaluation.metrics import (
    compute_metrics,
    decisions,
    finding_metrics,
    reported_present,
)
from dicomai.evaluation.plots import (
    plot_misclassified,
    plot_reliability,
    plot_risk_coverage,
    plot_roc,
)
from dicomai.evaluation.segmentation import SEGMENTATION, segmentation_metrics, segments
from dicomai.evaluation.uncertainty_quality import (
    COVERAGES,
    measures,
    risk_coverage,
    uncertainty_report,
)
from dicomai.imaging.decode import read_instance
from dicomai.imaging.preprocess import require_evaluable, to_model_input
from dicomai.imaging.spec import InputSpec
from dicomai.inference.runner import Classifier
from dicomai.inference.uncertainty import Summary
from dicomai.jobs.reading import prepare_frames, reported_frame
from dicomai.models.package import ClassSpec, LoadedModel, load_model
from dicomai.training.datasets import (
    DICOM_SUFFIXES,
    LabelledImages,
    Task,
    class_counts,
    load_evaluation_data,
    read_image01,
)
from dicomai.training.package_writer import positive_class, rounded

MAX_MISCLASSIFIED = 16
Log = Any
REPORT_FILES = (
    "predictions.csv", "roc.png", "reliability.png", "risk_coverage.png", "misclassified.png",
    "evaluation.json", "report.md", "report.html",
)  # fmt: skip
# A smaller set is read and scored in seconds: its summary line says enough.
PROGRESS_FROM = 100
PROGRESS_STEPS = 10


def evaluate_package(
    package: Path,
    data: Path,
    out: Path,
    labels_csv: Path | None = None,
    split: str = "test",
    log: Log = print,
    progress: Log | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate a model package on labelled images and write the report into `out`.

    Parameters
    ----------
    package
        A package folder.
    data
        Image folders (``test/<class>/`` or the class folders themselves) or, with
        `labels_csv`, a folder of images.
    out
        The report folder (created), checked by `check_report_folder` before any work.
    labels_csv
        A labels CSV, as `dicomai train` reads it.
    split
        Which set of the layout (or of the CSV's split column) to use.
    log
        Receives a summary line, and a line per image the daemon would not evaluate.
    progress
        Receives how many images were read and scored so far, at each tenth of a set of
        `PROGRESS_FROM` images or more (default: `log`).
    overwrite
        Write into a folder that holds an earlier report or other files.

    Returns
    -------
    dict
        What ``evaluation.json`` holds.

    Raises
    ------
    DatasetError, ModelPackageError
        On a bad data layout or package, a file that cannot be read (missing, not DICOM), or
        when the daemon would evaluate none of the images.
    DicomaiError
        If `out` is refused (`check_report_folder`); nothing is then written.
    """
    check_report_folder(out, package, overwrite)
    progress = log if progress is None else progress
    loaded = load_model(package)
    manifest = loaded.manifest
    classes = manifest.class_names
    listed = load_evaluation_data(data, classes, labels_csv, split, log=log)
    task = _task(loaded)
    if (listed.targets.ndim == 2) != (task is Task.MULTILABEL):
        given = "several labels per image" if listed.targets.ndim == 2 else "one label per image"
        raise DatasetError(
            f"{labels_csv or data}: the data give {given}, but the package's model is "
            f"{'multi-label' if task is Task.MULTILABEL else 'single-label'}"
        )
    images, frames, left_out = _model_inputs(listed, loaded, labels_csv or data, log, progress)
    classifier = Classifier(loaded)
    inputs, summary = _reported(classifier, frames, progress)
    probabilities = summary.mean
    thresholds = np.array([spec.threshold for spec in manifest.classes])
    positive = positive_class(manifest.classes)
    metrics = compute_metrics(probabilities, images.targets, task, classes, thresholds, positive)
    predicted = decisions(probabilities, task, thresholds, positive)
    present = None
    if task is Task.MULTICLASS:
        present = reported_present(probabilities, manifest.classes)
        metrics = _as_reported(metrics, present, images.targets, manifest.classes)
    report: dict[str, Any] = {
        "model": {
            "name": manifest.name,
            "version": manifest.version,
            "architecture": manifest.architecture,
            "weights_sha256": manifest.weights_sha256,
            # The further members' too: the registry refuses this report for another ensemble
            # sharing the first one.
            "ensemble_sha256": [member.sha256 for member in manifest.ensemble],
            "temperature": manifest.temperature,
        },
        "data": {
            "path": str(data),
            "n": len(images),
            "task": task.value,
            "per_class": class_counts(images, classes, task),
            "n_not_evaluated": len(left_out),
            "not_evaluated": left_out,
        },
        "decision": MULTICLASS_DECISION if task is Task.MULTICLASS else THRESHOLD_DECISION,
        **metrics,
        UNCERTAINTY: uncertainty_report(
            summary,
            predicted,
            images.targets,
            task,
            manifest.uncertainty.method,
            classifier.samples,
            errors=None
            if present is None
            else reported_wrong(present, images.targets, manifest.classes),
        ),
    }
    if images.masks is not None and segments(classifier):
        report[SEGMENTATION] = segmentation_metrics(classifier, images, inputs)
    if images.masks is not None and any(spec.is_finding for spec in manifest.classes):
        if len(images) >= PROGRESS_FROM:
            progress("localisation: drawing every heat-map method on the images with a lesion")
        report[LOCALISATION] = localisation_metrics(classifier, images, inputs)
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / "predictions.csv", images, classes, probabilities, predicted, present)
    _write_figures(out, report, images, inputs, summary, predicted, classifier, task, present)
    (out / "evaluation.json").write_text(json.dumps(_json_safe(rounded(report, 8)), indent=2))
    (out / "report.md").write_text(markdown(report))
    (out / "report.html").write_text(to_html(report))
    dice = (
        f", lesion Dice {report[SEGMENTATION]['dice_mean']:.3f}" if SEGMENTATION in report else ""
    )
    pointing = ""
    if LOCALISATION in report:
        found = report[LOCALISATION]
        used, best = found["method"], found["best"]
        pointing = f", heat maps ({used}) on the lesion {found['pointing'][used]:.2f}"
        if best != used:
            pointing += (
                f' ({best}: {found["pointing"][best]:.2f}; `explanation = "{best}"` in '
                "model.toml would draw its maps)"
            )
    skipped = f" ({len(left_out)} not evaluated, left out)" if left_out else ""
    log(
        f"{manifest.name} {manifest.version} on {len(images)} images{skipped}: "
        f"{_decided(metrics)}, "
        f"AUC {_auc_text(metrics, report['data']['per_class'])}, ECE {metrics['ece']:.3f}"
        f"{dice}{pointing}; report in {out}"
    )
    return report


def check_report_folder(out: Path, package: Path, overwrite: bool = False) -> None:
    """Refuse a report folder where the report would sit among the package's files, or
    replace an earlier report or sit among other files unasked.

    Parameters
    ----------
    out
        The report folder; may not exist yet.
    package
        The package folder evaluated.
    overwrite
        Accept a folder holding an earlier report (replaced) or other files (left as they are).

    Raises
    ------
    DicomaiError
        If `out` is the package folder or inside it (even with `overwrite`: a package holds
        its own files only), is not a folder, or, without `overwrite`, holds
        ``evaluation.json`` or any file that is not one of `REPORT_FILES`.
    """
    where, home = out.resolve(), package.resolve()
    if where == home or home in where.parents:
        raise DicomaiError(
            f"{out}: inside the package folder {package}, whose files are the package's own: "
            "give another --out"
        )
    if out.exists() and not out.is_dir():
        raise DicomaiError(f"{out}: not a folder, cannot hold the report: give another --out")
    if overwrite or not out.exists():
        return
    present = sorted(entry.name for entry in out.iterdir())
    others = [name for name in present if name not in REPORT_FILES]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise DicomaiError(
            f"{out} already holds other files ({shown}): give --overwrite to write the report "
            "among them, or another --out"
        )
    if "evaluation.json" in present:
        raise DicomaiError(
            f"{out} already holds an evaluation (evaluation.json): give --overwrite to "
            "replace it, or another --out"
        )


def _tell_progress(
    progress: Log, verb: str, unit: str, before: int, after: int, total: int
) -> None:
    """Say ``VERB AFTER/TOTAL UNIT`` when `after` passes a tenth of a set of `PROGRESS_FROM` or
    more (so at the end too)."""
    steps = PROGRESS_STEPS
    if total >= PROGRESS_FROM and after * steps // total > before * steps // total:
        progress(f"{verb} {after}/{total} {unit}")


UNCERTAINTY = "uncertainty"
THRESHOLD_DECISION = "probability >= class threshold"
MULTICLASS_DECISION = (
    "each finding class Present when its probability >= its threshold, as the SR reports it "
    "(several or none per image); accuracy_argmax and confusion_matrix_argmax: the most "
    "probable class, which the daemon does not report"
)
_ARGMAX_ONLY = (
    "precision_macro", "recall_macro", "f1_macro",
    "precision_weighted", "recall_weighted", "f1_weighted",
)  # fmt: skip


def reported_wrong(
    present: np.ndarray, targets: np.ndarray, specs: tuple[ClassSpec, ...]
) -> np.ndarray:
    """bool (N,): images on which any finding the SR reports Present or Absent is wrong."""
    truth = np.eye(len(specs), dtype=bool)[np.asarray(targets, dtype=np.int64)]
    findings = np.array([spec.is_finding for spec in specs], dtype=bool)
    return np.asarray((present != truth)[:, findings].any(axis=1))


def _as_reported(
    metrics: dict[str, Any],
    present: np.ndarray,
    targets: np.ndarray,
    specs: tuple[ClassSpec, ...],
) -> dict[str, Any]:
    """Multi-class `metrics` with the decisions the daemon reports (`finding_metrics`) in
    place of the most probable class's; that one's accuracy and matrix kept as ``*_argmax``."""
    classes = tuple(spec.name for spec in specs)
    found = finding_metrics(
        present, targets, classes, np.array([spec.is_finding for spec in specs], dtype=bool)
    )
    kept = {k: v for k, v in metrics.items() if k not in _ARGMAX_ONLY}
    kept["accuracy_argmax"] = kept.pop("accuracy")
    kept["confusion_matrix_argmax"] = kept.pop("confusion_matrix")
    kept["confusion_matrix"] = {
        name: rates.pop("confusion") for name, rates in found["per_class"].items()
    }
    kept["per_class"] = {
        spec.name: {
            **{k: metrics["per_class"][spec.name][k] for k in ("support", "auc", "threshold")},
            "is_finding": spec.is_finding,
            **found["per_class"].get(spec.name, {}),
        }
        for spec in specs
    }
    kept.update({k: v for k, v in found.items() if k != "per_class"})
    return kept


def _decided(metrics: dict[str, Any]) -> str:
    """The summary line's decision numbers: multi-class, the findings as the SR reports them."""
    if "accuracy" in metrics:
        return f"accuracy {metrics['accuracy']:.3f}"
    sensitivity = _number(metrics["sensitivity_macro"], 3)
    specificity = _number(metrics["specificity_macro"], 3)
    return (
        f"findings Present at their thresholds: sensitivity {sensitivity}, specificity "
        f"{specificity} (macro); argmax accuracy {metrics['accuracy_argmax']:.3f}"
    )


def _auc_text(metrics: dict[str, Any], counts: dict[str, int]) -> str:
    """The macro AUC, or n/a and why: no class had both its positives and its negatives."""
    value = metrics["auc_macro"]
    if not math.isnan(value):
        return f"{value:.3f}"
    if not counts:
        return "n/a (no images)"
    present = [name for name, count in counts.items() if count]
    if len(present) == 1 and len(counts) > 1:
        return f"n/a (every image is {present[0]}: an AUC needs images of two classes)"
    return "n/a (no class has both images with it and images without it)"


def _task(loaded: LoadedModel) -> Task:
    if loaded.manifest.multi_label:
        return Task.MULTILABEL
    return Task.BINARY if loaded.num_classes == 2 else Task.MULTICLASS


def _model_inputs(
    images: LabelledImages, loaded: LoadedModel, source: Path, log: Log, progress: Log
) -> tuple[LabelledImages, list[tuple[np.ndarray, ...]], list[dict[str, str]]]:
    """The images the daemon would evaluate and the model inputs of the frames it would read
    of each (one, or every frame not blank with ``frames = "all"``), and the others, each with
    the reason the daemon would give and logged on a line of its own.

    One blank or undecodable image had stopped the whole evaluation, where the daemon reports
    it "not evaluated" and goes on; its metrics are of the images it does evaluate.

    Raises
    ------
    DatasetError
        If a file cannot be read at all, or no image is left.
    """
    inputs, kept, left_out = [], [], []
    for index, path in enumerate(images.paths):
        try:
            inputs.append(_model_input(path, loaded))
        except NotEvaluable as reason:
            log(f"{path}: not evaluated, left out of the metrics: {reason}")
            left_out.append({"file": str(path), "reason": str(reason)})
        else:
            kept.append(index)
        _tell_progress(progress, "read", "images", index, index + 1, len(images.paths))
    if not images.paths:
        raise DatasetError(f"{source}: no images to evaluate")
    if not kept:
        raise DatasetError(
            f"{source}: the daemon would evaluate none of its {len(images)} images "
            f"({left_out[0]['reason']})"
        )
    return images.subset(np.array(kept, dtype=np.intp)), inputs, left_out


def _model_input(path: Path, loaded: LoadedModel) -> tuple[np.ndarray, ...]:
    """The inputs the daemon would give the model: DICOM through `prepare_frames`, else the
    same steps.

    Raises
    ------
    NotEvaluable
        If the daemon would not evaluate the image: blank, too small for the model, pixel
        data or lookup tables that cannot be applied, or any other error preparing it.
    DatasetError
        If the file cannot be read: missing, not DICOM, a header that cannot be parsed.
    """
    spec = loaded.manifest.input
    if path.suffix.lower() not in DICOM_SUFFIXES:
        image = read_image01(path, spec.voi_window, spec.keeps_colour)
        require_evaluable(image, spec)
        return (to_model_input(image, spec),)
    try:
        dataset = read_instance(path)
    except (NotEvaluable, OSError) as error:
        raise DatasetError(f"{path}: unreadable DICOM image: {error}") from None
    try:
        return prepare_frames(dataset, spec).inputs
    except (DicomaiError, OSError, MemoryError):
        raise
    except Exception as error:
        # As `dicomai.jobs.reading.read_image` says of such an image: the type only, since a
        # message may quote the header's values.
        raise NotEvaluable(f"image could not be prepared ({type(error).__name__})") from error


def _reported(
    classifier: Classifier, frames: list[tuple[np.ndarray, ...]], progress: Log
) -> tuple[list[np.ndarray], Summary]:
    """Each image's input and summary as the daemon reports it: of an image read with all its
    frames, the frame `reported_frame` chooses (a multi-frame image had been scored on its
    first frame only, whatever the package's ``frames``)."""
    flat = [tensor for group in frames for tensor in group]
    unit = "images" if len(flat) == len(frames) else "frames"
    every = _summary(classifier, flat, progress, unit)
    classes = classifier.loaded.manifest.classes
    rows, start = [], 0
    for group in frames:
        rows.append(start + reported_frame(every.mean[start : start + len(group)], classes))
        start += len(group)
    chosen = np.array(rows, dtype=np.intp)
    summary = Summary(*(getattr(every, f.name)[chosen] for f in fields(Summary)))
    return [flat[row] for row in rows], summary


def _summary(classifier: Classifier, inputs: list[np.ndarray], progress: Log, unit: str) -> Summary:
    chunks = []
    for start in range(0, len(inputs), 64):
        batch = torch.from_numpy(np.stack(inputs[start : start + 64]))
        chunks.append(classifier.summary(batch.to(classifier.device)))
        done = min(start + 64, len(inputs))
        _tell_progress(progress, "evaluated", unit, start, done, len(inputs))
    return Summary(*(np.concatenate([getattr(c, f.name) for c in chunks]) for f in fields(Summary)))


def _write_predictions(
    path: Path,
    images: LabelledImages,
    classes: tuple[str, ...],
    probabilities: np.ndarray,
    predicted: np.ndarray,
    present: np.ndarray | None,
) -> None:
    """One row per image; multi-class (`present` given): the findings the SR calls Present
    (``present``) and the most probable class (``argmax``) in place of ``predicted``."""

    def names(value: Any) -> str:
        if np.ndim(value):
            return "|".join(c for c, on in zip(classes, value, strict=True) if on)
        return classes[int(value)]

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        decided = ["predicted"] if present is None else ["present", "argmax"]
        writer.writerow(["file", "truth", *decided, *classes])
        for i, file in enumerate(images.paths):
            said = [names(predicted[i])]
            if present is not None:
                said.insert(0, names(present[i]))
            probs = [f"{p:.8f}" for p in probabilities[i]]
            writer.writerow([str(file), names(images.targets[i]), *said, *probs])


def _write_figures(
    out: Path,
    report: dict[str, Any],
    images: LabelledImages,
    inputs: list[np.ndarray],
    summary: Summary,
    predicted: np.ndarray,
    classifier: Classifier,
    task: Task,
    present: np.ndarray | None,
) -> None:
    """The figures; multi-class (`present` given) shows as misclassified the images whose
    reported findings are wrong (a finding Present that is not the truth, or a true finding
    Absent), captioned with those findings."""
    probabilities = summary.mean
    classes = classifier.loaded.manifest.class_names
    onehot = images.targets if task is Task.MULTILABEL else np.eye(len(classes))[images.targets]
    plot_roc(out / "roc.png", probabilities, np.asarray(onehot), classes)
    plot_reliability(out / "reliability.png", report["reliability"], report["ece"])
    found, errors = measures(summary, predicted, images.targets, task, classifier.samples)
    curves = {name: risk_coverage(values, errors) for name, values in found.items()}
    plot_risk_coverage(out / "risk_coverage.png", curves, float(errors.mean()))
    said = predicted if present is None else present
    if present is None:
        wrong = predicted != images.targets
    else:
        findings = np.array([spec.is_finding for spec in classifier.loaded.manifest.classes])
        wrong = present != (np.asarray(onehot, dtype=bool) & findings)
    if wrong.ndim == 2:
        wrong = wrong.any(axis=1)
    chosen = np.flatnonzero(wrong)[:MAX_MISCLASSIFIED]
    items = []
    if len(chosen):
        explained = classifier.predict([(str(i), inputs[i]) for i in chosen])
        spec = classifier.loaded.manifest.input
        for i, prediction in zip(chosen, explained, strict=True):
            caption = f"{images.paths[i].name[:24]}\ntrue {_label(images.targets[i], classes)}"
            caption += f", said {_label(said[i], classes)}"
            items.append((_as_seen(inputs[i], spec), prediction.heatmap, caption))
    plot_misclassified(out / "misclassified.png", items)


def _as_seen(model_input: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A model input as the image it was made from, in [0, 1]: RGB (H, W, 3) for a colour
    model, whose finding may be in the hue (its red plane alone showed a blue lesion black),
    else grey (H, W), the three channels being one."""
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    image = model_input * std + mean
    shown = image.transpose(1, 2, 0) if spec.keeps_colour else image[0]
    return np.clip(shown, 0.0, 1.0)


def _label(value: Any, classes: tuple[str, ...]) -> str:
    if np.ndim(value):
        return "|".join(c for c, on in zip(classes, value, strict=True) if on) or "none"
    return classes[int(value)]


def _json_safe(value: Any) -> Any:
    """NaN and infinity as null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


_SUMMARY_KEYS = (
    "accuracy", "auc_macro", "auc_micro", "precision_macro", "recall_macro", "f1_macro",
    "precision_weighted", "recall_weighted", "f1_weighted", "sensitivity", "specificity",
    "ppv", "npv", "sensitivity_macro", "specificity_macro", "ppv_macro", "npv_macro",
    "accuracy_argmax", "ece", "mce", "brier",
)  # fmt: skip


def _number(value: Any, digits: int = 4) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))
    )


def _tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables: (title, header, rows), shared by the Markdown and HTML forms."""
    summary = [[key, _number(report[key])] for key in _SUMMARY_KEYS if key in report]
    tables = [("Summary", ["metric", "value"], summary)]
    tables += (
        _multiclass_tables(report) if report["task"] == "multiclass" else _class_tables(report)
    )
    if SEGMENTATION in report:
        rows = [[key, _number(value)] for key, value in report[SEGMENTATION].items()]
        tables.append(("Lesion segmentation", ["metric", "value"], rows))
    quality = report[UNCERTAINTY]
    rows = [
        [name, _number(q["auroc"]), _number(q["aurc"]), _number(q["spearman"])]
        + [_number(q["risk_at_coverage"].get(f"{c:g}")) for c in COVERAGES]
        for name, q in quality["measures"].items()
    ]
    title = (
        f"Uncertainty against errors ({quality['method']}, {quality['samples']} pass(es); "
        f"{quality['errors']} errors in {quality['answers']} answers)"
    )
    header = ["measure", "AUROC", "AURC", "Spearman"] + [f"risk at {c:.0%}" for c in COVERAGES]
    tables.append((title, header, rows))
    if LOCALISATION in report:
        found = report[LOCALISATION]
        rows = [
            [
                method
                + (" (the package's)" if method == found["method"] else "")
                + (" (best)" if method == found["best"] != found["method"] else ""),
                _number(value),
            ]
            for method, value in found["pointing"].items()
        ]
        title = (
            f"Heat maps on the lesion ({found['n_lesion']} images with a lesion; maximum on "
            f"the mask or within {found['margin_px']} px)"
        )
        tables.append((title, ["method", "pointing game"], rows))
    left_out = report["data"].get("not_evaluated")
    if left_out:
        rows = [[item["file"], item["reason"]] for item in left_out]
        title = f"Not evaluated ({len(left_out)} images, left out of every number above)"
        tables.append((title, ["file", "reason the daemon gives"], rows))
    return tables


def _class_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Binary and multi-label: per class, and the confusion matrix."""
    per_class = [
        [name, *(_number(v[k]) for k in ("precision", "recall", "f1", "auc", "threshold")),
         str(v["support"])]
        for name, v in report["per_class"].items()
    ]  # fmt: skip
    classes = list(report["per_class"])
    matrices = zip(classes, report["confusion_matrix"], strict=True)
    if report["task"] == "multilabel":
        confusion = [[name, *(str(x) for row in m for x in row)] for name, m in matrices]
        confusion_header = ["class", "TN", "FP", "FN", "TP"]
    else:
        confusion = [[name, *(str(x) for x in row)] for name, row in matrices]
        confusion_header = ["true \\ predicted", *classes]
    return [
        ("Per class", ["class", "precision", "recall", "F1", "AUC", "threshold", "support"],
         per_class),
        ("Confusion matrix", confusion_header, confusion),
    ]  # fmt: skip


def _multiclass_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Multi-class: the findings as the SR reports them, then the argmax matrix, labelled."""
    rates = ("sensitivity", "specificity", "ppv", "npv", "f1")
    per_class = [
        [name, "yes" if v["is_finding"] else "no (not reported)",
         *(_number(v.get(k)) for k in (*rates, "auc", "threshold")), str(v["support"])]
        for name, v in report["per_class"].items()
    ]  # fmt: skip
    findings = [
        [name, *(str(x) for row in m for x in row)]
        for name, m in report["confusion_matrix"].items()
    ]
    classes = list(report["per_class"])
    argmax = [
        [name, *(str(x) for x in row)]
        for name, row in zip(classes, report["confusion_matrix_argmax"], strict=True)
    ]
    header = ["class", "finding", "sensitivity", "specificity", "PPV", "NPV", "F1", "AUC"]
    return [
        ("Per class (finding classes: Present at the class threshold, as the SR reports)",
         [*header, "threshold", "support"], per_class),
        ("Findings as the SR reports them (Present at the class threshold)",
         ["class", "TN", "FP", "FN", "TP"], findings),
        ("Confusion matrix of the most probable class (argmax; not what the daemon reports)",
         ["true \\ predicted", *classes], argmax),
    ]  # fmt: skip


def _heading(report: dict[str, Any]) -> str:
    model, data = report["model"], report["data"]
    skipped = data.get("n_not_evaluated")
    left_out = (
        f", {skipped} more left out, which the daemon would not evaluate (listed below)"
        if skipped
        else ""
    )
    return (
        f"{model['name']} {model['version']} ({model['architecture']}, temperature "
        f"{model['temperature']}) on {data['n']} images of {data['path']} ({data['task']})"
        f"{left_out}; decision: {report['decision']}"
    )


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    lines = [f"# Evaluation of {report['model']['name']} {report['model']['version']}", ""]
    lines += [_heading(report), ""]
    for title, header, rows in _tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |"]
        lines += ["| " + " | ".join("---" for _ in header) + " |"]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += ["## Figures", "", "![ROC curves](roc.png)", "![Reliability](reliability.png)"]
    lines += ["![Risk against coverage](risk_coverage.png)"]
    lines += ["![Misclassified images with their heat maps](misclassified.png)", ""]
    return "\n".join(lines)


def to_html(report: dict[str, Any]) -> str:
    """The report as a self-contained HTML page (figures beside it)."""
    title = html.escape(f"Evaluation of {report['model']['name']} {report['model']['version']}")
    parts = [f"<!doctype html><meta charset=utf-8><title>{title}</title><h1>{title}</h1>"]
    parts.append(f"<p>{html.escape(_heading(report))}</p>")
    for name, header, rows in _tables(report):
        parts.append(f"<h2>{html.escape(name)}</h2><table border=1 cellpadding=4>")
        parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    for figure in ("roc.png", "reliability.png", "risk_coverage.png", "misclassified.png"):
        parts.append(f'<p><img src="{figure}" alt="{figure}"></p>')
    return "\n".join(parts) + "\n"
