"""The noise streams of the sampler: which generator draws each sample's noise.

Chunk j of the input with id ``example_id`` (chunks of ``noise_chunk`` samples) is
``normal_(0, sigma)`` in the noisy batch's memory order from a generator seeded with
``chunk_seed(seed, example_id, j, purpose)``, so a sample's noise depends only on (seed, id,
purpose, sample index) on a device type. torch's CPU generator keeps only a seed's low 32 bits:
a chunk whose seed repeats those of an earlier chunk of the same input is reseeded with
``mix64(s) >> 1`` until new (``chunk_seeds``). ``PURPOSES`` (certify, validation, selection)
are hashed into the key: unrelated noise for each. See docs/architecture.md, "The sampling loop".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from certify.math.validation import UsageError

NOISE_CHUNK = 128  #: samples per noise chunk on a CPU
LONG_NOISE_CHUNK = 4096  #: the most off the CPU (a chunk costs a kernel launch there) ...
LONG_NOISE_CHUNK_BYTES = 32 * 2**20  # ... as long as one chunk of float32 noise fits in this
_MASK64 = (1 << 64) - 1


def mix64(z: int) -> int:
    """SplitMix64 finaliser: a bijective scramble of a 64-bit integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


#: What noise streams are for, and the 64-bit tag each mixes into its key (none: "certify").
PURPOSES = {
    "certify": None,
    "validation": int.from_bytes(hashlib.sha256(b"topk-smoothing validation").digest()[:8]),
    "selection": int.from_bytes(hashlib.sha256(b"topk-smoothing selection").digest()[:8]),
}


def check_purpose(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise UsageError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    return purpose


def stream_seed(seed: int, example_id: int, purpose: str = "certify") -> int:
    """The part of ``chunk_seed`` shared by all chunks of one input's stream."""
    key = mix64(seed & _MASK64)
    tag = PURPOSES[purpose]
    if tag is not None:
        key = mix64(key ^ tag)
    return mix64(key ^ (example_id & _MASK64))


def chunk_seed(seed: int, example_id: int, chunk: int, purpose: str = "certify") -> int:
    """Seed of one chunk of one input's noise stream (a 63-bit integer)."""
    return int(chunk_seeds([stream_seed(seed, example_id, purpose)], chunk + 1)[0, chunk])


def seed_of_chunk(stream: int, chunk: int) -> int:
    """The first choice of a chunk's seed, from the input's ``stream_seed``."""
    return mix64(stream ^ chunk) >> 1


def chunk_seeds(streams: Sequence[int], chunks: int) -> np.ndarray:
    """``(len(streams), chunks)`` uint64 seeds of each input's chunks, distinct in the low 32
    bits: ``seed_of_chunk`` unless it repeats an earlier chunk's (then ``mix64(t) >> 1`` until
    new). Seed j depends only on chunks ``0 .. j``."""
    stream = np.asarray(streams, dtype=np.uint64)[:, None]  # (B, 1)
    with np.errstate(over="ignore"):
        seeds = _mix64_array(stream ^ np.arange(chunks, dtype=np.uint64)) >> np.uint64(1)
    low = np.sort(seeds & np.uint64(0xFFFFFFFF), axis=1)  # (B, chunks)
    for b in np.flatnonzero((low[:, 1:] == low[:, :-1]).any(axis=1)):  # rare: see above
        used: set[int] = set()
        for j in range(chunks):
            t = int(seeds[b, j])
            while t & 0xFFFFFFFF in used:
                t = mix64(t) >> 1
            used.add(t & 0xFFFFFFFF)
            seeds[b, j] = t
    return seeds


def _mix64_array(z: np.ndarray) -> np.ndarray:  # mix64 of each element, wrapping
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def noise_chunk(device: torch.device | str, sample_shape: Sequence[int]) -> int:
    """Samples per noise chunk: ``NOISE_CHUNK`` on a CPU; elsewhere the largest power of two up
    to ``LONG_NOISE_CHUNK`` whose float32 chunk fits ``LONG_NOISE_CHUNK_BYTES``. It never
    depends on the batch size.

    Example:
        >>> noise_chunk("cpu", (3, 32, 32)), noise_chunk("cuda", (3, 32, 32))
        (128, 2048)
    """
    if torch.device(device).type == "cpu":
        return NOISE_CHUNK
    numel = max(1, int(np.prod(sample_shape, dtype=np.int64)))
    chunk = LONG_NOISE_CHUNK
    while chunk > NOISE_CHUNK and chunk * numel * 4 > LONG_NOISE_CHUNK_BYTES:
        chunk //= 2
    return chunk
