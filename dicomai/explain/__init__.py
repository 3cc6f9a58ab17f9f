"""Explaining predictions: Grad-CAM family and attention-relevance heat maps, target layers."""

from dicomai.explain.gradcam import (
    METHODS,
    default_method,
    explain_top_finding,
    gradcam,
    methods_for,
)
from dicomai.explain.target import find_target_layer

__all__ = [
    "METHODS",
    "default_method",
    "explain_top_finding",
    "find_target_layer",
    "gradcam",
    "methods_for",
]
