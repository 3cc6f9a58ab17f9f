"""The evaluation gate: a version is activated only if it is not worse than the active one.

The rule. Metrics are compared where both versions have them, from the best evidence there is:

- both versions have a site evaluation on the site's reference set (`dicomai models
  evaluation`): those two;
- only the candidate has one: the candidate's site evaluation against the active version's
  package `[metrics]`. A bad site evaluation must not be outvoted by the vendor's numbers, and
  a site evaluation is seldom better than a package's own test set, so this errs towards
  refusing; evaluating the active version on the same reference set gives a fair comparison.
  The package names a metric after the set it was measured on (`dicomai train` writes
  `val_accuracy`, `val_auc_macro`, ...; a vendor may write `test_accuracy`), the site evaluation
  without one (`dicomai evaluate` writes `accuracy`, `auc_macro`, ...): a site metric `X` is
  compared with the package's `X`, else its `test_X`, else its `val_X` (`PACKAGE_SETS`). Only
  names of one definition meet: a multi-class `dicomai evaluate` scores the findings the SR
  reports under names training does not write (`sensitivity_macro`) and writes no
  `accuracy` or `f1_macro` (training's, of the most probable class), so a decision metric of
  one rule never meets one of the other;
- only the active version has one: refused. The site judges its models on its own data; the
  candidate's package numbers, from other data, cannot show it is not worse;
- neither: the packages' `[metrics]`.

Compared are the numeric metrics whose name has one of `HIGHER_IS_BETTER` as a word between
underscores (`test_accuracy`, `val_auc_macro`, `f1_macro`, `sensitivity`, ...). The candidate
passes if none of them is lower than the active version's by more than the tolerance
(`[rollout] gate_tolerance`, default 0.02). With no metric in common it does not pass: nothing
shows it is not worse. With no active version there is nothing to compare and it passes. The
decision names the evidence it used (`GateDecision.source`), and the CLI says it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomai.db.models import ModelVersion
from dicomai.errors import DicomaiError

HIGHER_IS_BETTER = (
    "auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "recall",
    "f1",
    "dice",
)


# Words that make a gated name something lower is better of (``dice_loss``) or no score at all
# (``auc_std``, ``val_auc_per_class`` is a table and skipped as such).
_NOT_A_SCORE = {"loss", "std", "var", "error", "ece", "mce", "brier", "ci", "low", "high"}


# The sets a package's metric may be named after, the preferred first: a held-out test set is
# measured as a site evaluation is; validation chose the package's thresholds and flatters it.
PACKAGE_SETS = ("test", "val")


@dataclass(frozen=True)
class MetricComparison:
    """One metric of the candidate beside the active version's (`active_name`, where the
    active version's is named otherwise: ``val_accuracy`` beside ``accuracy``)."""

    name: str
    candidate: float
    active: float
    ok: bool
    active_name: str | None = None

    def __str__(self) -> str:
        theirs = f"{self.active_name} " if self.active_name else ""
        return f"{self.name} {self.candidate:.4g} < {theirs}{self.active:.4g}"


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate may be activated, on which evidence, and why not."""

    passed: bool
    source: str
    comparisons: tuple[MetricComparison, ...]
    message: str

    def detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "source": self.source,
            "message": self.message,
            "metrics": {c.name: [c.candidate, c.active] for c in self.comparisons},
        }
        named = {c.name: c.active_name for c in self.comparisons if c.active_name}
        if named:
            detail["active_names"] = named
        return detail


def gate_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics the gate compares: finite numbers named like ``auc_macro``,
    ``val_accuracy``, ``f1_weighted`` (a word of `HIGHER_IS_BETTER` between underscores; the
    suffix ``_macro`` of `dicomai evaluate` must not hide the metric, as it once did)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and bool(set(key.split("_")) & set(HIGHER_IS_BETTER))
        and not set(key.split("_")) & _NOT_A_SCORE
    }


def evaluation_metrics(evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics of a registered evaluation: its ``metrics`` table, or its top level."""
    if not evaluation:
        return {}
    inner = evaluation.get("metrics")
    return inner if isinstance(inner, dict) else evaluation


def decide(candidate: ModelVersion, active: ModelVersion | None, tolerance: float) -> GateDecision:
    """Apply the gate rule (module docstring) to `candidate` against `active`."""
    if active is None:
        return GateDecision(True, "none", (), "no active version to compare with")
    if active.evaluation and not candidate.evaluation:
        source = f"site evaluation of the active {active.label} only"
        message = (
            f"{active.label} has a site evaluation and {candidate.label} has none: record one "
            f"on the same reference set (dicomai models evaluation {candidate.name} "
            f"{candidate.version} FILE)"
        )
        return GateDecision(False, source, (), message)
    source, mine, theirs, names = _evidence(candidate, active)
    comparisons = tuple(
        MetricComparison(
            key,
            mine[key],
            theirs[names[key]],
            mine[key] >= theirs[names[key]] - tolerance,
            names[key] if names[key] != key else None,
        )
        for key in sorted(names)
    )
    if not comparisons:
        message = f"{candidate.label} and the active {active.label} share no metric ({source})"
        if candidate.evaluation and not active.evaluation:
            message += (
                f"; record a site evaluation of {active.label} on the same reference set "
                f"(dicomai models evaluation {active.name} {active.version} FILE)"
            )
        return GateDecision(False, source, (), message)
    worse = [c for c in comparisons if not c.ok]
    if worse:
        listed = ", ".join(str(c) for c in worse)
        message = (
            f"{candidate.label} is worse than the active {active.label} beyond the "
            f"tolerance {tolerance:g} ({source}: {listed})"
        )
        return GateDecision(False, source, comparisons, message)
    return GateDecision(True, source, comparisons, f"not worse than {active.label} ({source})")


def _evidence(
    candidate: ModelVersion, active: ModelVersion
) -> tuple[str, dict[str, float], dict[str, float], dict[str, str]]:
    """What the gate compares: a description, the candidate's metrics, the active's, and for
    each candidate metric compared the name of the active's it is compared with."""
    packaged = gate_metrics(active.manifest.get("metrics", {}))
    if candidate.evaluation and active.evaluation:
        mine = gate_metrics(evaluation_metrics(candidate.evaluation))
        site = gate_metrics(evaluation_metrics(active.evaluation))
        return "site evaluation", mine, site, {key: key for key in mine if key in site}
    if candidate.evaluation:
        source = f"site evaluation of {candidate.label} against the package metrics of the active"
        mine = gate_metrics(evaluation_metrics(candidate.evaluation))
        return source, mine, packaged, package_names(mine, packaged)
    mine = gate_metrics(candidate.manifest.get("metrics", {}))
    return "package metrics", mine, packaged, {key: key for key in mine if key in packaged}


def package_names(site: dict[str, float], packaged: dict[str, float]) -> dict[str, str]:
    """For each site-evaluation metric, the package metric that measures the same quantity.

    ``X`` itself, else ``test_X``, else ``val_X`` (`PACKAGE_SETS`); a site metric named after
    a set (``test_accuracy``) meets the package's of that name first, then the others. Site
    metrics the package has under none of these names are left out.
    """
    names = {}
    for key in site:
        named_after, _, rest = key.partition("_")
        base = rest if named_after in PACKAGE_SETS and rest else key
        for name in (key, base, *(f"{kind}_{base}" for kind in PACKAGE_SETS)):
            if name in packaged:
                names[key] = name
                break
    return names


def read_evaluation(path: Path) -> dict[str, Any]:
    """Read an evaluation JSON file: an object with gate metrics, or with a ``metrics`` object.

    Raises
    ------
    DicomaiError
        The file is unreadable, not a JSON object, or holds no metric the gate compares.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DicomaiError(f"{path}: not a readable JSON file: {error}") from None
    if not isinstance(data, dict):
        raise DicomaiError(f"{path}: must hold a JSON object")
    metrics = evaluation_metrics(data)
    for key, value in metrics.items():
        # NaN and Infinity are JavaScript, not JSON: PostgreSQL refuses them in a JSON column.
        if isinstance(value, float) and not math.isfinite(value):
            raise DicomaiError(f"{path}: {key} is {value}; give a finite number or leave it out")
    scores = gate_metrics(metrics)
    if not scores:
        raise DicomaiError(
            f"{path}: no metric named like *_{'/'.join(HIGHER_IS_BETTER)} with a finite value"
        )
    for key, value in scores.items():
        if not 0.0 <= value <= 1.0:
            raise DicomaiError(
                f"{path}: {key} = {value:g} is not in [0, 1] (a fraction: 0.97, not 97)"
            )
    return data
