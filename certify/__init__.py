"""Certified top-k robustness by randomized smoothing (Jia et al., ICLR 2020).

Where things live:

- ``certify.math``: Clopper-Pearson bounds, Theorem 1's radius, PREDICT, sequential
  certification; no Lightning.
- ``certify.sampling``: ``SmoothedClassifier`` and its seeded noise streams; no Lightning.
- ``certify.training``: the ``CertifiedTopKAccuracy`` metric, its ``markdown_table`` and the
  ``CertificationCallback`` used while training (Lightning).
- ``certify.commands``: the ``topk-smoothing`` console commands ``certify``, ``predict``,
  ``report`` and ``radius`` (runners, output directories, settings, count files, checkpoints).

The names below are importable from ``certify`` itself; the callback (which needs Lightning)
is loaded only when asked for, so the math imports light.
"""

from certify.math.bounds import (
    binocp_bounds,
    clopper_pearson_lower,
    clopper_pearson_upper,
    simuem_bounds,
)
from certify.math.prediction import certified_prediction, sequential_prediction, top_k_set
from certify.math.radius import certified_radius, radius_from_bounds
from certify.math.sequential import SequentialCertificate, certify_sequential
from certify.sampling.smoothing import SmoothedClassifier
from certify.training.metric import CertifiedTopKAccuracy

__all__ = [
    "CertificationCallback",
    "CertifiedTopKAccuracy",
    "SequentialCertificate",
    "SmoothedClassifier",
    "binocp_bounds",
    "certified_prediction",
    "certified_radius",
    "certify_sequential",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "radius_from_bounds",
    "sequential_prediction",
    "simuem_bounds",
    "top_k_set",
]


def __getattr__(name: str):
    if name == "CertificationCallback":
        from certify.training.callback import CertificationCallback

        return CertificationCallback
    raise AttributeError(f"module 'certify' has no attribute {name!r}")
