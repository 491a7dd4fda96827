"""Keep freed memory in the process, so that CPU forward passes do not page-fault.

glibc's ``malloc`` hands blocks above ``M_MMAP_THRESHOLD`` (128 KiB at first, raised as such
blocks are freed, to 32 MiB at most) to the kernel with ``mmap`` and gives them back on
``free``, and gives the top of the heap back once more than ``M_TRIM_THRESHOLD`` is free. A
forward pass allocates and frees its activations, so under those defaults every pass can
touch fresh pages, each costing a page fault. Measured on the development VM (2 cores): the
digits CNN at batch 4,096 took 18,000 page faults per pass and ran at 59,000 to 69,000
samples/s instead of 126,000 to 134,000; CIFAR ResNet-20 at batch 128 took 35,000 per pass
and ran at 510 to 540 samples/s instead of 850 to 1,000. Which of these paths a pass takes
depends on the heap's history, so throughput also switched between two levels from one
second to the next.

``keep_freed_memory()`` raises both thresholds once per process (blocks up to 32 MiB come from
the heap, which is kept unless 1 GiB at its top is free). The sampler calls it before
sampling or tuning on a CPU and the command line calls it at start-up. The process keeps up
to its peak heap instead of returning freed memory to the system. Set
``TOPK_SMOOTHING_MALLOPT=0`` to leave the allocator alone; settings made through glibc's own
environment variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES``) are left alone too.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 2**30
OPT_OUT = "TOPK_SMOOTHING_MALLOPT"
_GLIBC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); whether they are raised.

    ``False`` where the C library has no ``mallopt`` (not glibc), on opt-out
    (``TOPK_SMOOTHING_MALLOPT=0``) or where the user set glibc's own malloc variables.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get(OPT_OUT, "1") == "0" or any(v in os.environ for v in _GLIBC_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting it also stops glibc from moving the trim threshold.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
