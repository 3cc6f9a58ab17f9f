"""Explaining predictions: Grad-CAM family heat maps and target-layer discovery."""

from dicomai.explain.gradcam import METHODS, gradcam
from dicomai.explain.target import find_target_layer

__all__ = ["METHODS", "find_target_layer", "gradcam"]
