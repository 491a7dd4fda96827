"""The settings of ``topk-smoothing certify``, checked before anything is built or written."""

from __future__ import annotations

from certify.validation import check_alpha, check_autocast, check_bounds, check_seed, check_sigma


class CertifySettingsError(ValueError):
    """An impossible ``certify`` setting (one-line message, exit status 2)."""


def _check_int(name: str, value, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CertifySettingsError(f"{name} must be an integer >= {low}, got {value!r}")


def check_settings(
    n, alpha, bounds, split, skip, max_examples, batch_size, sigma, autocast=None, **more
) -> None:
    """Reject impossible ``certify`` settings before anything is built.

    ``more``: ``seed``, ``k`` (a list, or None for the default) and ``output_dir``, if given.
    """
    if "output_dir" in more and not str(more["output_dir"]).strip():
        raise CertifySettingsError(f"output_dir must name a directory, got {more['output_dir']!r}")
    k = more.get("k")
    if k is not None and (len(k) == 0 or len(set(k)) != len(k)):
        raise CertifySettingsError(f"k must list distinct values (or be left out), got {list(k)}")
    _check_int("n", n, 1)
    _check_int("skip", skip, 1)
    _check_int("max_examples", max_examples, 1, optional=True)
    _check_int("batch_size", batch_size, 1, optional=True)
    if split not in ("test", "val"):
        raise CertifySettingsError(f"split must be 'test' or 'val', got {split!r}")
    try:
        check_alpha(alpha)
        check_bounds(bounds)
        check_autocast(autocast)
        check_seed(more.get("seed"))
        if sigma is not None:
            check_sigma(sigma)
    except ValueError as err:
        raise CertifySettingsError(str(err)) from None
