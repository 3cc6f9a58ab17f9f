"""The input specification a model package declares for its images."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, TypeVar

from dicomai.errors import ModelPackageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# A model input larger than this is a typo in model.toml, not a network anyone serves.
MAX_INPUT_SIDE = 4096

# `window = "stored"`: the image's own VOI LUT or first window, as the modality sent it.
STORED_WINDOW = "stored"
# CT windows in Hounsfield units, (center, width): the usual presets of CT viewers and
# radiology teaching (lung -600/1500, mediastinum 50/350, abdomen 40/400, bone 400/1800,
# brain 40/80).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


_E = TypeVar("_E", bound=StrEnum)


class Equalization(StrEnum):
    """Contrast equalisation applied before resizing."""

    NONE = "none"
    HIST = "hist"
    CLAHE = "clahe"


class ColorMode(StrEnum):
    """What a model sees of a colour image."""

    GREY = "grey"
    RGB = "rgb"


class FrameSelection(StrEnum):
    """Which frames of a multi-frame instance a model evaluates."""

    FIRST = "first"
    ALL = "all"


@dataclass(frozen=True)
class InputSpec:
    """How an image is turned into a model's input tensor.

    Parameters
    ----------
    size : tuple of int
        Output size as ``(rows, columns)``.
    mean, std : tuple of float
        Per-channel normalisation applied to values in [0, 1].
    equalize : str
        ``"none"``, ``"hist"`` (global histogram equalisation) or ``"clahe"``.
    clahe_clip : float
        CLAHE contrast limit; used only when ``equalize == "clahe"``.
    frames : str
        ``"first"`` or ``"all"`` frames of a multi-frame instance.
    window : str or tuple of float
        The VOI window of monochrome images: ``"stored"`` (the image's own VOI LUT or first
        window, else an automatic one), a CT preset in Hounsfield units (``"lung"``,
        ``"mediastinum"``, ``"abdomen"``, ``"bone"``, ``"brain"``), or ``(center, width)``
        in modality units, applied as a LINEAR window (PS3.3 C.11.2.1.2.1) in place of the
        image's own, so that the model's input does not depend on the window a site stored.
    color : str
        ``"grey"``: colour images become their luminance, as radiographs are (the default);
        ``"rgb"``: colour and palette images keep their three channels, for models whose
        findings are in colour (dermatology, pathology). Monochrome images are repeated
        into three channels either way.

    Raises
    ------
    dicomai.errors.ModelPackageError
        If any value is out of range; the message names the field.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    equalize: Equalization = Equalization.NONE
    clahe_clip: float = 2.0
    frames: FrameSelection = FrameSelection.FIRST
    window: str | tuple[float, float] = STORED_WINDOW
    color: ColorMode = ColorMode.GREY

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ so that lists and plain strings
        # from a TOML file become the declared tuple and enum types.
        object.__setattr__(self, "size", _size(self.size))
        object.__setattr__(self, "mean", _triple("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _triple("std", self.std, positive=True))
        object.__setattr__(self, "equalize", _choice("equalize", self.equalize, Equalization))
        object.__setattr__(self, "clahe_clip", _positive("clahe_clip", self.clahe_clip))
        object.__setattr__(self, "frames", _choice("frames", self.frames, FrameSelection))
        object.__setattr__(self, "window", _window(self.window))
        object.__setattr__(self, "color", _choice("color", self.color, ColorMode))

    @property
    def keeps_colour(self) -> bool:
        """Whether colour images reach the model in colour (``color = "rgb"``)."""
        return self.color is ColorMode.RGB

    @property
    def voi_window(self) -> tuple[float, float] | None:
        """``(center, width)`` in modality units that replaces the image's own VOI, or None
        to keep the image's (``window = "stored"``)."""
        if isinstance(self.window, tuple):
            return self.window
        return WINDOW_PRESETS.get(self.window)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """Build a spec from the ``[preprocessing]`` table of a model package.

        Parameters
        ----------
        d : dict
            Any subset of the field names; missing fields take their defaults.

        Returns
        -------
        InputSpec
            The validated specification.

        Raises
        ------
        dicomai.errors.ModelPackageError
            On an unknown key (a misspelt option must not be silently ignored) or a bad value.
        """
        if not isinstance(d, dict):
            raise ModelPackageError("input spec: expected a table of options")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ModelPackageError(f"input spec: unknown option(s) {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as plain TOML/JSON-friendly values (lists and strings).

        Returns
        -------
        dict
            A dictionary that :meth:`from_dict` turns back into an equal spec.
        """
        d: dict[str, Any] = {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "equalize": self.equalize.value,
            "clahe_clip": self.clahe_clip,
            "frames": self.frames.value,
        }
        # Left out when stored: the packages written before the option read the same.
        if self.window != STORED_WINDOW:
            d["window"] = list(self.window) if isinstance(self.window, tuple) else self.window
        if self.color is not ColorMode.GREY:
            d["color"] = self.color.value
        return d


def _finite_number(value: object) -> float | None:
    # bool is an int subclass; `true` in model.toml is never meant as a number.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _size(value: object) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ModelPackageError("input spec: size must be two integers [rows, columns]")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ModelPackageError("input spec: size must be two integers [rows, columns]")
    rows, cols = value
    if not (0 < rows <= MAX_INPUT_SIDE and 0 < cols <= MAX_INPUT_SIDE):
        raise ModelPackageError(f"input spec: size must be between 1 and {MAX_INPUT_SIDE}")
    return (rows, cols)


def _triple(name: str, value: object, *, positive: bool) -> tuple[float, float, float]:
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ModelPackageError(f"input spec: {name} must be three numbers (one per channel)")
    numbers = [_finite_number(v) for v in value]
    a, b, c = numbers
    if a is None or b is None or c is None:
        raise ModelPackageError(f"input spec: {name} must be three finite numbers")
    if positive and min(a, b, c) <= 0:
        raise ModelPackageError(f"input spec: {name} must be greater than zero")
    return (a, b, c)


def _positive(name: str, value: object) -> float:
    number = _finite_number(value)
    if number is None or number <= 0:
        raise ModelPackageError(f"input spec: {name} must be a positive number")
    return number


def _choice(name: str, value: object, enum: type[_E]) -> _E:
    allowed = [member.value for member in enum]
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(f'"{choice}"' for choice in allowed)
        raise ModelPackageError(f"input spec: {name} must be one of {choices}")
    return enum(value)


def _window(value: object) -> str | tuple[float, float]:
    if isinstance(value, str) and (value == STORED_WINDOW or value in WINDOW_PRESETS):
        return value
    if isinstance(value, list | tuple) and len(value) == 2:
        center, width = (_finite_number(v) for v in value)
        # PS3.3 C.11.2.1.2.1: a LINEAR window is at least 1 wide.
        if center is not None and width is not None and width >= 1:
            return (center, width)
    names = ", ".join(f'"{name}"' for name in (STORED_WINDOW, *WINDOW_PRESETS))
    raise ModelPackageError(
        f"input spec: window must be one of {names}, or [center, width] of finite numbers "
        "in modality units with width at least 1"
    )
