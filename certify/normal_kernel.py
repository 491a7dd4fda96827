"""A faster copy of torch's CPU ``normal_``, used only where it gives the same bits.

On a CPU the sampler draws each noise chunk with ``Generator.manual_seed(seed)`` and
``normal_(0, sigma)``: a Mersenne Twister feeding a Box-Muller transform. torch draws the
uniforms one call at a time, which costs about 8 ns per number right after a forward pass:
5 % to 6 % of the digits CNN's sampling time. ``normal_kernel.cpp`` does the same arithmetic
with the twist and the tempering eight words at a time and torch's own ``avx_mathfun.h`` for
the transform, a block of 624 values at a time: about three times faster after a forward
pass (0.6 ms instead of 1.6 to 2.2 ms for the noise of 4,096 digits, on the development VM).

The counts are part of the product (the same seed gives the same counts), so the kernel is
used only when all of these hold, and torch's ``normal_`` is used otherwise, with the same
result:

- torch runs its AVX2 CPU kernels (``torch.backends.cpu.get_cpu_capability() == "AVX2"``;
  other builds draw through other code);
- a C++ compiler (``$CXX``, else ``c++``) builds the file against this torch's headers; the
  library is cached under ``$TOPK_SMOOTHING_CACHE`` (default ``~/.cache/topk-smoothing``; a
  folder in the temporary directory where that cannot be written), keyed by the source, the
  header, the flags, the compiler and the torch version;
- in this process, it reproduced ``normal_`` bit for bit on about 400,000 numbers (sizes with
  and without a remainder of 16, several seeds and standard deviations). Compiled with other
  floating-point contraction rules, about 1 % of the numbers differ, so a mismatch shows;
- ``TOPK_SMOOTHING_NOISE_KERNEL`` is not ``0`` (set it to ``0`` to keep torch's ``normal_``).

``kernel_status()`` says which is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("normal_kernel.cpp")
OPT_OUT = "TOPK_SMOOTHING_NOISE_KERNEL"
CACHE = "TOPK_SMOOTHING_CACHE"
#: torch's AVX2 CPU kernels are built with these (``torch.__config__.show()``: -O2,
#: -fno-math-errno, -fno-trapping-math; -mavx2 -mfma -mf16c for the AVX2 files).
FLAGS = (
    "-O2", "-fno-math-errno", "-fno-trapping-math", "-mavx2", "-mfma", "-mf16c",
    "-DCPU_CAPABILITY_AVX2", "-fPIC", "-shared",
)  # fmt: skip
#: (size, seed, std) of the self-check: sizes with and without a remainder of 16
CHECKS = [
    (16, 0, 1.0),
    (17, 2**32 - 1, 0.25),
    (100, 2**63 - 1, 0.5),
    (625, 12345, 0.12),
    (6_400, 2**40 + 7, 1.0),
    (8_192, 987_654_321, 0.5),
    (32_771, 31, 3.0),
    (3 * 32 * 32 * 128, 2**31, 0.25),
]


class NormalKernel:
    """The loaded kernel: ``kernel(x, seed, std)`` writes what
    ``x.normal_(0, std, generator=torch.Generator().manual_seed(seed))`` writes into the
    contiguous float32 CPU tensor ``x`` of 16 or more values.

    ``kernel.at(address, count, seed, std)`` does the same for ``count >= 16`` floats at a raw
    address, without checks: the sampler's hot path (about 1 us per call instead of 5 us),
    for a buffer it checked once.
    """

    def __init__(self, library: ctypes.CDLL):
        self.at = library.topk_normal_fill
        self.at.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float]
        self.at.argtypes += [ctypes.c_float]
        self.at.restype = ctypes.c_int

    def __call__(self, x: torch.Tensor, seed: int, std: float) -> None:
        if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError("the noise kernel fills contiguous float32 CPU tensors only")
        if x.numel() < 16:
            raise ValueError(f"the noise kernel fills 16 values or more, got {x.numel()}")
        self.at(x.data_ptr(), x.numel(), seed & 0xFFFFFFFFFFFFFFFF, 0.0, std)


Fill = Callable[[torch.Tensor, int, float], None]
_loaded: tuple[NormalKernel | None, str] | None = None


def normal_kernel() -> NormalKernel | None:
    """The kernel, or ``None`` where it is not in use (see the module's docstring)."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return None
    return _load()[0]


def kernel_status() -> str:
    """Which CPU noise drawer the sampler uses, and why (one line)."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return f"torch normal_ ({OPT_OUT}=0)"
    kernel, why = _load()
    return "compiled kernel" if kernel is not None else f"torch normal_ ({why})"


def _load() -> tuple[NormalKernel | None, str]:
    global _loaded
    if _loaded is None:
        _loaded = build()
    return _loaded


def build(flags: tuple[str, ...] = FLAGS) -> tuple[NormalKernel | None, str]:
    """Compile (or find in the cache), load and check the kernel: ``(kernel, "ok")`` or
    ``(None, why not)``."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    if capability != "AVX2":
        return None, f"torch's CPU capability is {capability}, the kernel reproduces AVX2"
    header = Path(torch.__file__).parent / "include" / "ATen" / "native" / "cpu"
    header = header / "avx_mathfun.h"
    if not header.is_file():
        return None, f"torch's headers are not installed ({header} is missing)"
    try:
        kernel = NormalKernel(ctypes.CDLL(str(_compiled(header, flags))))
    except (OSError, subprocess.SubprocessError) as error:
        return None, str(error).splitlines()[0] if str(error) else type(error).__name__
    mismatch = self_check(kernel)
    if mismatch:
        return None, f"the compiled kernel does not reproduce torch's normal_ ({mismatch})"
    return kernel, "ok"


def self_check(fill: Fill) -> str:
    """'' when ``fill`` writes torch's ``normal_`` bit for bit on ``CHECKS``; else the case."""
    for size, seed, std in CHECKS:
        generator = torch.Generator().manual_seed(seed)
        expected = torch.empty(size).normal_(0.0, std, generator=generator)
        got = torch.full((size,), float("nan"))
        fill(got, seed, std)
        differ = int((got.view(torch.int32) != expected.view(torch.int32)).sum())
        if differ:
            return f"{differ} of {size} values differ at seed {seed}, std {std}"
    return ""


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$TOPK_SMOOTHING_CACHE`` or ``~/.cache/topk-smoothing``."""
    if os.environ.get(CACHE):
        return Path(os.environ[CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "topk-smoothing"


def _compiled(header: Path, flags: tuple[str, ...]) -> Path:
    """The shared library, compiled on first use (atomically: concurrent processes are safe)."""
    compiler = os.environ.get("CXX") or "c++"
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), header.read_bytes(), " ".join(flags).encode()):
        key.update(part)
    key.update(f"{compiler} {torch.__version__}".encode())
    name = f"normal_kernel-{key.hexdigest()[:16]}.so"
    user = getattr(os, "getuid", lambda: "user")()
    fallback = Path(tempfile.gettempdir()) / f"topk-smoothing-{user}"
    for directory in (cache_dir(), fallback):  # the temporary one if the cache is read-only
        library = directory / name
        if library.is_file():
            return library
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
            break
        except OSError:
            if directory == fallback:
                raise
    os.close(handle)
    command = [compiler, *flags, f"-I{header.parents[3]}", str(SOURCE), "-o", partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise OSError(f"{compiler} could not build the noise kernel: {detail}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library
