"""The settings of ``topk-smoothing certify``, checked before anything is built or written."""

from __future__ import annotations

from certify.math.validation import (
    check_alpha,
    check_bounds,
    check_int,
    check_radii,
    check_seed,
    check_sigma,
    check_top_k,
)
from certify.sampling.options import check_autocast


class CertifySettingsError(ValueError):
    """An impossible ``certify`` setting (one-line message, exit status 2)."""


def check_settings(
    n, alpha, bounds, split, skip, max_examples, batch_size, sigma, autocast=None, **more
) -> None:
    """Reject impossible ``certify`` settings before anything is built.

    ``more``: ``seed``, ``k`` (a list, or None for the default), ``output_dir``,
    ``sequential`` and ``radii`` (its targets), if given. The k values are checked against the
    number of classes once the model is built.
    """
    if more.get("radii") is not None and not more.get("sequential"):
        raise CertifySettingsError(
            "--radii sets the targets of --sequential true; a fixed-n run certifies every "
            "radius (choose the report's radii with `topk-smoothing report --radii`)"
        )
    if more.get("sequential") and bounds != "simuem":
        raise CertifySettingsError(
            "--sequential true bounds with simuem (Clopper-Pearson per label), got bounds "
            f"{bounds!r}"
        )
    if "output_dir" in more and more["output_dir"] is not None:
        if not str(more["output_dir"]).strip():
            raise CertifySettingsError(
                f"output_dir must name a directory, got {more['output_dir']!r}"
            )
    if split not in ("test", "val"):
        raise CertifySettingsError(f"split must be 'test' or 'val', got {split!r}")
    try:
        if more.get("k") is not None:
            check_top_k(more["k"], None)
        check_int(n, "n")
        check_int(skip, "skip")
        check_int(max_examples, "max_examples", optional=True)
        check_int(batch_size, "batch_size", optional=True)
        check_alpha(alpha)
        check_bounds(bounds)
        check_autocast(autocast)
        check_seed(more.get("seed"))
        if sigma is not None:
            check_sigma(sigma)
        if more.get("radii") is not None:
            check_radii(more["radii"])
    except ValueError as err:
        raise CertifySettingsError(str(err)) from None
