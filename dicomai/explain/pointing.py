"""The pointing game: does a heat map's maximum fall on the finding (Zhang et al., ECCV 2016)."""

from __future__ import annotations

import numpy as np


def pointing_hits(
    maps: np.ndarray, centres: np.ndarray, radii: np.ndarray, margin: float
) -> np.ndarray:
    """Whether each map's maximum lies within its round finding's radius plus `margin` pixels.

    Parameters
    ----------
    maps
        (N, H, W) heat maps.
    centres
        (N, 2) (row, column) centres of the findings.
    radii
        (N,) their radii in pixels.
    margin
        Tolerance in pixels; the game's usual one is 15 pixels at 224², scaled to the maps' size.

    Returns
    -------
    numpy.ndarray
        bool (N,): True where the map points into its finding.

    Raises
    ------
    ValueError
        If the arrays do not describe the same number of images.
    """
    if not len(maps) == len(centres) == len(radii):
        raise ValueError(f"{len(maps)} maps for {len(centres)} centres and {len(radii)} radii")
    flat = maps.reshape(len(maps), -1).argmax(axis=1)
    rows, cols = np.unravel_index(flat, maps.shape[1:])
    distance = np.hypot(rows - centres[:, 0], cols - centres[:, 1])
    return np.asarray(distance <= radii + margin, dtype=bool)
