"""Explaining predictions: Grad-CAM family heat maps and target-layer discovery."""

from dicomai.explain.gradcam import METHODS, default_method, explain_top_finding, gradcam
from dicomai.explain.target import find_target_layer

__all__ = ["METHODS", "default_method", "explain_top_finding", "find_target_layer", "gradcam"]
