"""Where a heat map is hottest, as an outline in the source image's pixel coordinates."""

from __future__ import annotations

import cv2
import numpy as np

# The hot spot is the region around the maximum where the heat is at least half the maximum
# (the full width at half maximum of a peak): it follows the map, not a fixed size.
HALF_MAXIMUM = 0.5


def has_hot_spot(heatmap: np.ndarray | None) -> bool:
    """Whether `heatmap` has a positive maximum to outline (a map of zeros has none)."""
    return heatmap is not None and float(np.max(np.nan_to_num(heatmap), initial=0.0)) > 0


def hot_spot_outline(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Return a closed polygon around the heat map's maximum, scaled to a source image.

    The polygon encloses the connected region around the maximum where the heat is at least
    ``HALF_MAXIMUM`` of the maximum, in the image pixel coordinates of an SR SCOORD (PS3.3
    C.18.6.1.2: the top left corner of the image is (0, 0), the centre of the top left pixel
    (0.5, 0.5)), so that a heat map at the model's input resolution lands on the source's
    ``rows`` by ``columns``.

    Parameters
    ----------
    heatmap
        float heat map (rows, columns) at the model's input resolution.
    rows, columns
        Size of the source image the outline is drawn on.

    Returns
    -------
    numpy.ndarray
        float32 (N, 2) of (column, row) points, N >= 4, the first point repeated last.

    Raises
    ------
    ValueError
        If `heatmap` is not 2-D or has no positive maximum.
    """
    if heatmap.ndim != 2:
        raise ValueError(f"heat map must be 2-D, not {heatmap.shape}")
    heat = np.nan_to_num(heatmap.astype(np.float32))
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    if heat[peak] <= 0:
        raise ValueError("the heat map has no hot spot")
    _, labels = cv2.connectedComponents((heat >= HALF_MAXIMUM * heat[peak]).astype(np.uint8))
    region = (labels == labels[peak]).astype(np.uint8)
    points = _outline(region)
    scale = np.array([columns / heat.shape[1], rows / heat.shape[0]], dtype=np.float32)
    return np.vstack([points, points[:1]]) * scale


def _outline(region: np.ndarray) -> np.ndarray:
    """(column, row) corners around a connected region, in pixel-edge coordinates."""
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    points = contour.reshape(-1, 2).astype(np.float32) + 0.5  # pixel centres
    if len(points) >= 3 and cv2.contourArea(contour) > 0:
        return points
    # A line or a single pixel has no area: take the corners of its bounding box instead.
    x, y, width, height = cv2.boundingRect(contour)
    return np.array(
        [[x, y], [x + width, y], [x + width, y + height], [x, y + height]], dtype=np.float32
    )
