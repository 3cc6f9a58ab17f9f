"""`[input] window`: a model sees its CT in the window it was trained on, whatever window order
the sending site stored, in the daemon and in training alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomai.cli import main as cli_main
from dicomai.cli import training as training_cli
from dicomai.errors import ModelPackageError
from dicomai.imaging.decode import read_instance
from dicomai.imaging.preprocess import modality_values, prepare, render
from dicomai.imaging.spec import InputSpec
from dicomai.training.datasets import read_image01

SIZE = (64, 64)


def ct(centers: list[float], widths: list[float]) -> pydicom.Dataset:
    """CT_small (HU = stored - 1024) with the windows a site stored, first one first."""
    ds = read_instance(get_testdata_file("CT_small.dcm", download=False))
    ds.WindowCenter, ds.WindowWidth = centers, widths
    return ds


MEDIASTINUM_FIRST = ([40, -600], [400, 1500])
LUNG_FIRST = ([-600, 40], [1500, 400])


def test_a_model_window_makes_the_input_independent_of_the_stored_window_order() -> None:
    # The same pixels sent as 40\-600 by one vendor and -600\40 by another gave the model
    # two different images (rendered means 0.40 and 0.80).
    stored = InputSpec(size=SIZE)
    assert not np.allclose(
        prepare(ct(*MEDIASTINUM_FIRST), stored)[1], prepare(ct(*LUNG_FIRST), stored)[1]
    ), "the stored windows should matter under window = 'stored'"
    model = InputSpec(size=SIZE, window="mediastinum")
    one, other = prepare(ct(*MEDIASTINUM_FIRST), model), prepare(ct(*LUNG_FIRST), model)
    assert np.array_equal(one[1], other[1]) and np.array_equal(one[0], other[0])


@pytest.mark.parametrize(
    ("preset", "pair"),
    [
        ("lung", [-600, 1500]),
        ("mediastinum", [50, 350]),
        ("abdomen", [40, 400]),
        ("bone", [400, 1800]),
        ("brain", [40, 80]),
    ],
)
def test_a_preset_is_its_center_and_width(preset: str, pair: list[float]) -> None:
    ds = ct(*LUNG_FIRST)
    by_name = prepare(ds, InputSpec(size=SIZE, window=preset))[1]
    by_pair = prepare(ds, InputSpec(size=SIZE, window=pair))[1]
    assert np.array_equal(by_name, by_pair)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_the_model_window_is_linear_on_modality_values(photometric: str) -> None:
    ds = ct(*LUNG_FIRST)
    ds.PhotometricInterpretation = photometric
    hu = modality_values(ds)
    # PS3.3 C.11.2.1.2.1, LINEAR, with center 50 and width 350.
    expected = np.clip((hu - (50 - 0.5)) / (350 - 1) + 0.5, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    assert np.allclose(render(ds, window=(50, 350)), expected, atol=1e-6)


def test_the_model_window_replaces_a_voi_lut() -> None:
    ds = ct(*LUNG_FIRST)
    item = Dataset()
    item.LUTDescriptor, item.LUTData = [4096, -1024, 16], [4095 - i for i in range(4096)]
    ds.VOILUTSequence = Sequence([item])
    with_lut = render(ds, window=(50, 350))
    del ds.VOILUTSequence
    assert np.array_equal(with_lut, render(ds, window=(50, 350)))


@pytest.mark.parametrize(
    "window",
    [
        "soft",
        "Lung",
        ["lung"],
        [50],
        [50, 350, 1],
        [50, 0],
        [50, 0.5],
        [50, -350],
        [float("nan"), 350],
        [50, float("inf")],
        [True, 350],
        ["50", "350"],
        7,
    ],
)
def test_a_bad_window_is_refused_naming_the_field(window: object) -> None:
    with pytest.raises(ModelPackageError, match="window must be one of"):
        InputSpec.from_dict({"window": window})


def test_the_window_round_trips_through_the_package_table() -> None:
    assert "window" not in InputSpec().to_dict(), "packages without the option read the same"
    assert InputSpec.from_dict({"window": "stored"}).voi_window is None
    for window in ("bone", [-600, 1500]):
        spec = InputSpec.from_dict({"window": window})
        assert InputSpec.from_dict(spec.to_dict()) == spec
        assert spec.to_dict()["window"] == window
    assert InputSpec.from_dict({"window": [-600, 1500]}).voi_window == (-600.0, 1500.0)


def test_training_reads_dicom_in_the_packages_window(tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    ct(*LUNG_FIRST).save_as(path, enforce_file_format=True)
    spec = InputSpec(window="mediastinum")
    assert np.array_equal(
        read_image01(path, spec.voi_window), render(ct(*MEDIASTINUM_FIRST), 0, (50, 350))
    )
    assert not np.array_equal(read_image01(path), read_image01(path, spec.voi_window))


def train_settings(monkeypatch, tmp_path: Path, *options: str) -> tuple[int, str, list]:
    """`dicomai train` with `options`, up to the settings it would train with."""
    import dicomai.training.runs as runs

    captured: list = []

    def capture(settings, log):
        captured.append(settings)
        raise SystemExit(0)

    monkeypatch.setattr(runs, "train_package", capture)
    training_cli.register(cli_main.cli)
    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--name", "ct"]
    result = CliRunner().invoke(cli_main.cli, [*args, *options])
    return result.exit_code, result.output, captured


@pytest.mark.parametrize(
    ("option", "window"),
    [
        ([], "stored"),
        (["--window", "lung"], "lung"),
        (["--window=-600,1500"], (-600.0, 1500.0)),
        (["--window", "40,400", "--normalize", "mid-grey"], (40.0, 400.0)),
    ],
)
def test_train_writes_its_window_into_the_package_spec(
    monkeypatch, tmp_path: Path, option: list[str], window: object
) -> None:
    code, output, captured = train_settings(monkeypatch, tmp_path, *option)
    assert code == 0 and captured, output
    spec = captured[0].spec
    assert spec.window == window
    # The package writer puts InputSpec.to_dict() into model.toml's [input] table.
    assert InputSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("value", ["soft", "40,0", "40", "a,b", "40,nan"])
def test_train_refuses_a_bad_window_before_training(
    monkeypatch, tmp_path: Path, value: str
) -> None:
    code, output, captured = train_settings(monkeypatch, tmp_path, "--window", value)
    assert code == 2 and not captured, output
    assert "--window" in output and "Traceback" not in output, output
    assert "window must be" in output or "a preset or CENTER,WIDTH" in output, output
