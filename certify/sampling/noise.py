"""The noise streams of the sampler: which generator draws each sample's noise.

Every input's n samples are cut into chunks of a fixed length (``noise_chunk``; the last chunk
holds the remaining samples) and chunk j of the input with id ``example_id`` is torch's
``normal_(0, sigma)`` of that chunk, drawn in the noisy batch's memory order (channels-last
batches: ``(length, H, W, C)``) by a generator seeded with ``chunk_seed(seed, example_id, j)``.
The noise of a sample is therefore a pure function of ``(seed, example_id, sample index)`` on a
given device type, whatever the batch size, the other inputs of the call or the process.

torch's CPU generator keeps only the low 32 bits of its seed, so two chunks of one input whose
seeds agree there would draw the same noise: their samples would not be independent, which
the confidence bounds assume. For n = 100,000 (782 chunks) that happens to one input in
14,000, for n = 1,000,000 to one in 140. A chunk whose seed repeats the low 32 bits of an
earlier chunk of the same input is therefore seeded by ``mix64(s) >> 1`` of its seed s
instead, until they are new (``chunk_seeds``). Other chunks keep ``seed_of_chunk``.

Streams also have a purpose (``PURPOSES``): ``"certify"`` for certificates (the streams above),
``"validation"`` for the live certification while training and ``"selection"`` for the
samples that choose labels before others bound them. The purpose is hashed into the stream's
key, so the same seed and example give unrelated noise for two purposes: the samples that
chose a checkpoint or a label set are never the samples that certify it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from certify.math.validation import UsageError

NOISE_CHUNK = 128  #: samples per noise chunk on a CPU
#: Off the CPU every chunk costs a kernel launch (about 10 us of host time, longer than the
#: GPU takes to draw a small chunk), so chunks are longer there: up to this many samples ...
LONG_NOISE_CHUNK = 4096
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
    """Seeds of chunks ``0 .. chunks - 1`` of each input, distinct in their low 32 bits.

    Chunk j of the input with ``stream_seed`` s gets ``seed_of_chunk(s, j)``, unless its low
    32 bits are those of an earlier chunk's seed of the same input; it then gets
    ``mix64(t) >> 1`` of that seed t, repeated until they are not. Seed j depends only on
    chunks ``0 .. j``, never on how many chunks are asked for.

    Returns:
        ``(len(streams), chunks)`` uint64 array.

    Example:
        >>> int(chunk_seeds([stream_seed(0, 7)], 3)[0, 2]) == chunk_seed(0, 7, 2)
        True
    """
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


def _mix64_array(z: np.ndarray) -> np.ndarray:
    """``mix64`` of every element of a uint64 array (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def noise_chunk(device: torch.device | str, sample_shape: Sequence[int]) -> int:
    """Samples per noise chunk for inputs of ``sample_shape`` sampled on ``device``.

    ``NOISE_CHUNK`` on a CPU. On a GPU, the largest power of two up to ``LONG_NOISE_CHUNK``
    whose chunk of float32 noise fits in ``LONG_NOISE_CHUNK_BYTES`` (at least ``NOISE_CHUNK``):
    4,096 for 8x8 digits, 2,048 for 3x32x32 CIFAR images, 128 for 3x224x224 ImageNet images.
    It depends only on the device type and the input shape, never on the batch size, so the
    counts stay a pure function of ``(seed, example_id)`` on a given device type.

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
