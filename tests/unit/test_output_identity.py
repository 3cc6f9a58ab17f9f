"""What tells a radiologist's PACS one model's, one report's output from another's.

Two models active on one study, superseded overlays beside current ones, probabilities at
the ends of the scale: the series list, the burned-in caption and the SR must not read alike
where the outputs differ, nor claim a certainty the model does not have.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

import highdicom as hd
import numpy as np
import pytest
from test_results import MODEL, PNEUMOTHORAX, _evaluated, _saved, drawn_captions, make_context

from dicomai.inference.types import ClassScore
from dicomai.results import codes
from dicomai.results.context import ModelIdentity, ResultContext
from dicomai.results.pmap import PMAP_SERIES_NUMBER
from dicomai.results.sc import SC_SERIES_NUMBER, build_sc, caption_lines, render_caption
from dicomai.results.seg import SEG_SERIES_NUMBER
from dicomai.results.sr import SR_SERIES_NUMBER, build_sr

KINDS = (SR_SERIES_NUMBER, SC_SERIES_NUMBER, SEG_SERIES_NUMBER, PMAP_SERIES_NUMBER)
# The radiologist's two models, and two whose names are cut to the same head.
NAMES = (
    "demo-chest-nodule",
    "second-opinion-nodule",
    "chest-xray-nodule-detector-a",
    "chest-xray-nodule-detector-b",
)


def _of(model_name: str, revision: int = 1, version: str = "1.0.0") -> ResultContext:
    model = dataclasses.replace(MODEL, name=model_name, version=version)
    return dataclasses.replace(make_context(), model=model, revision=revision)


def _numbers(model_name: str, revisions: range) -> set[int]:
    context = _of(model_name)
    return {
        dataclasses.replace(context, revision=revision).series_number(kind)
        for revision in revisions
        for kind in KINDS
    }


def test_two_models_never_share_a_series_number_whatever_the_revision() -> None:
    # Both models' SRs were Series 9001 and both heat-map series 9002, then 9011/9012...
    revisions = range(1, 60)
    numbers = {name: _numbers(name, revisions) for name in NAMES}
    for name in NAMES:
        assert len(numbers[name]) == len(KINDS) * len(revisions), f"{name} reuses a number"
        for other in NAMES:
            if other != name:
                shared = numbers[name] & numbers[other]
                assert not shared, f"{name} and {other} both number series {sorted(shared)[:4]}"


def test_a_later_report_of_a_model_is_numbered_higher_across_its_versions() -> None:
    # A viewer sorting by Series Number takes the newest report as current.
    for kind in KINDS:
        by_revision = [
            _of("demo-chest-nodule", revision, version).series_number(kind)
            for revision, version in ((1, "1.0.0"), (2, "1.0.0"), (3, "2.1.0"), (4, "2.2.0"))
        ]
        assert by_revision == sorted(set(by_revision)), by_revision
        assert all(number % 10 == kind % 10 for number in by_revision), "kind digit lost"


def test_a_models_series_numbers_are_stable() -> None:
    # Derived from a hash of the name (not Python's salted hash): the same in every worker
    # process and after a restart, so nothing needs to be stored with the model.
    assert _of("demo-chest-nodule").series_number(SR_SERIES_NUMBER) == 12551
    assert _of("demo-chest-nodule", 3, "2.0.0").series_number(SC_SERIES_NUMBER) == 32552
    assert _of("second-opinion-nodule").series_number(SC_SERIES_NUMBER) == 11352


def test_cut_model_names_with_a_common_head_stay_apart() -> None:
    # Both read 'AI heat map #2 (chest-xray-n~ 1.0.0) - not for primary diagnosis'.
    suffix = " - " + codes.NOT_FOR_DIAGNOSIS
    shown = [
        codes.series_description(
            "AI heat map #2", ModelIdentity(name, "1.0.0", "x", "0" * 64), suffix
        )
        for name in NAMES[2:]
    ]
    assert shown[0] != shown[1], shown
    for text in shown:
        assert len(text) <= 64 and text.endswith(" 1.0.0)" + suffix), text
        assert text.startswith("AI heat map #2 (chest-x"), text


def test_two_models_outputs_differ_in_series_number_and_description(tmp_path) -> None:
    long_names = (
        "chest-xray-nodule-detector-with-a-long-name-a",
        "chest-xray-nodule-detector-with-a-long-name-b",
    )
    built = {}
    for name in long_names:
        context = _of(name, revision=2)
        sr, sc = build_sr(context), build_sc(context, 0)
        _saved(sr, tmp_path, f"sr-{name}.dcm")
        _saved(sc, tmp_path, f"sc-{name}.dcm")
        built[name] = {
            kind: (int(ds.SeriesNumber), str(ds.SeriesDescription))
            for kind, ds in (("sr", sr), ("sc", sc))
        }
    one, other = (built[name] for name in long_names)
    for kind in ("sr", "sc"):
        assert one[kind][0] != other[kind][0], f"both {kind}s are series {one[kind][0]}"
        assert one[kind][1] != other[kind][1], f"both {kind}s read {one[kind][1]!r}"
        assert "#2" in one[kind][1] and len(one[kind][1]) <= 64


def test_a_superseded_overlay_says_which_report_it_is_of_and_when(tmp_path, monkeypatch):
    # The same source image's overlays of reports 1 and 3 differed only in the description.
    first = dataclasses.replace(make_context(), created=datetime(2026, 11, 25, 1, 58, 12))
    third = dataclasses.replace(first, revision=3, created=datetime(2026, 11, 25, 2, 4, 59))

    old_lines, new_lines = drawn_captions(first, monkeypatch), drawn_captions(third, monkeypatch)

    assert old_lines[1:3] == ["chest-ptx 1.2.0", "report #1, 2026-11-25 01:58"]
    assert new_lines[1:3] == ["chest-ptx 1.2.0", "report #3, 2026-11-25 02:04"]
    assert all(line.isascii() for line in old_lines + new_lines)
    old_band = render_caption(caption_lines(first, 0), 512)
    new_band = render_caption(caption_lines(third, 0), 512)
    assert not np.array_equal(old_band, new_band), "the two overlays' captions look alike"
    sc, sr = build_sc(third, 0), build_sr(third)
    assert sc.DerivationDescription.endswith("chest-ptx 1.2.0 - report #3, 2026-11-25 02:04")
    assert sc.DerivationDescription.isascii()
    # The caption's time is the report's: the SR's and the overlay's Content Date and Time.
    for built in (sc, sr):
        assert (str(built.ContentDate), str(built.ContentTime)[:6]) == ("20261125", "020459")
    _saved(sc, tmp_path, "sc.dcm")


def _shown_in_sr(context: ResultContext, meaning: str) -> list[float]:
    report = hd.sr.Comprehensive3DSR.from_dataset(build_sr(context)).content
    groups = report.get_image_measurement_groups() + report.get_planar_roi_measurement_groups()
    return [
        float(m.value)
        for g in groups
        if g.finding_type is not None and g.finding_type.meaning == meaning
        for m in g.get_measurements()
    ]


@pytest.mark.parametrize(
    ("probability", "finding", "normal", "on_overlay"),
    [
        (1.0, 0.9999, 0.0001, ">99%"),
        (0.99996, 0.9999, 0.0001, ">99%"),
        (0.996, 0.996, 0.004, ">99%"),
        (0.994, 0.994, 0.006, "99%"),
        (0.004, 0.004, 0.996, "<1%"),
        (0.00004, 0.0001, 0.9999, "<1%"),
        (0.0, 0.0001, 0.9999, "<1%"),
    ],
)
def test_no_probability_is_shown_as_certain(
    probability: float, finding: float, normal: float, on_overlay: str
) -> None:
    # "Probability = 1.0" in the SR and "Nodule: 100%" on the overlay read as certainty.
    context = make_context()
    ct = context.sources[0].dataset
    changed = dataclasses.replace(
        context,
        sources=context.sources[:1],
        predictions=(_evaluated(ct, probability),),
        # Multi-label: its "normal" class is reported too (`reported_scores`).
        model=dataclasses.replace(context.model, multi_label=True),
    )
    assert _shown_in_sr(changed, PNEUMOTHORAX.meaning) == [finding]
    assert _shown_in_sr(changed, "Normal") == [normal]
    assert caption_lines(changed, 0)[0] == f"{PNEUMOTHORAX.meaning}: {on_overlay}"


def test_a_shown_probability_stays_open_and_on_its_thresholds_side() -> None:
    rng = np.random.default_rng(7)
    probabilities = np.concatenate([rng.uniform(size=400), [0.0, 1.0, 1e-5, 1 - 1e-5]])
    thresholds = (0.0002, 0.01, 0.3, 0.5, 0.73456, 0.99, 0.9998)
    for threshold in thresholds:
        for probability in probabilities:
            score = ClassScore("x", PNEUMOTHORAX, float(probability), threshold, True)
            shown = codes.shown_probability(score, 4)
            assert 0.0001 <= shown <= 0.9999, (probability, threshold, shown)
            assert (shown >= threshold) == score.positive, (probability, threshold, shown)
            percent = codes.shown_percent(score)
            assert percent not in ("0%", "100%"), (probability, threshold, percent)
