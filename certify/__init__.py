"""Certified top-k robustness by randomized smoothing (Jia et al., ICLR 2020).

The math (bounds, radius, sampling) is free of Lightning; the metric and the callback that
build on it live in their own modules.
"""

from certify.bounds import (
    binocp_bounds,
    clopper_pearson_lower,
    clopper_pearson_upper,
    simuem_bounds,
)
from certify.metric import CertifiedTopKAccuracy
from certify.radius import certified_radius, radius_from_bounds
from certify.smoothing import SmoothedClassifier, top_k_set

__all__ = [
    "CertificationCallback",
    "CertifiedTopKAccuracy",
    "SmoothedClassifier",
    "binocp_bounds",
    "certified_radius",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "radius_from_bounds",
    "simuem_bounds",
    "top_k_set",
]


def __getattr__(name: str):
    # The callback needs Lightning: load it only when asked for, so the math imports light.
    if name == "CertificationCallback":
        from certify.callback import CertificationCallback

        return CertificationCallback
    raise AttributeError(f"module 'certify' has no attribute {name!r}")
