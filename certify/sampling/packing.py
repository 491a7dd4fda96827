"""Packing noise chunks into forward batches of exactly ``batch_size`` rows.

The noise of one input is cut into fixed chunks (``NOISE_CHUNK`` samples, the last one
shorter) and a chunk can only be drawn whole. Filling batches with whole chunks only would
leave up to ``chunk - 1`` rows of a batch empty (with n = 100 and batches of 256, a fifth of
every forward pass). So a batch may end with the first rows of a chunk and the next batch
take the rest: that chunk is drawn twice, each time at a place of the buffer where its unused
part lands on rows that later operations overwrite. Counts do not depend on the order in which
samples are seen, so the counts are those of whole chunks; the full chunks of all inputs come
first and the shorter last chunks after them, so that full chunks tile the batches.

The plan is a stream of operations on one buffer of ``capacity(batch_size, chunk)`` rows:

- ``("noise", b, j, length, row)``: draw chunk j of input b (``length`` samples) into rows
  ``row .. row + length`` and add the input to them;
- ``("copy", src, dst, rows)``: copy buffer rows ``src ..`` to ``dst ..`` (disjoint ranges);
- ``("forward", lo, hi)``: classify rows ``lo .. hi`` and count the labels.

With ``batch_size >= chunk`` the buffer has exactly ``batch_size`` rows and every forward pass
but the last has ``batch_size`` rows when ``batch_size >= 2 * chunk``; a smaller batch is cut
short when the chunk to split cannot be placed. With ``batch_size < chunk`` the buffer has
``batch_size + chunk`` rows: whole chunks are appended after the rows left over from the
previous forward passes, which move to the front.
"""

from __future__ import annotations

from collections.abc import Iterator


def capacity(batch_size: int, chunk: int) -> int:
    """Rows of the noisy buffer: one batch, plus one chunk when the batch is smaller."""
    return batch_size if batch_size >= chunk else batch_size + chunk


def _chunks(num_inputs: int, n: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    """(input, chunk index, length): the full chunks of every input, then the short ones."""
    full, rest = divmod(n, chunk)
    for b in range(num_inputs):
        for j in range(full):
            yield b, j, chunk
    if rest:
        for b in range(num_inputs):
            yield b, full, rest


def plan(num_inputs: int, n: int, batch_size: int, chunk: int) -> Iterator[list[tuple]]:
    """The operations that sample ``n`` noisy copies of each input, one batch at a time.

    Yields one list of operations per buffer refill; every sample appears in exactly one
    ``forward`` and every forward pass but the last has ``batch_size`` rows, except in the
    rare cut-short case described in the module docstring.
    """
    if batch_size < chunk:
        yield from _plan_carry(num_inputs, n, batch_size, chunk)
    else:
        yield from _plan_split(num_inputs, n, batch_size, chunk)


def _plan_carry(num_inputs, n, batch_size, chunk) -> Iterator[list[tuple]]:
    rows, ops = 0, []
    for b, j, length in _chunks(num_inputs, n, chunk):
        if rows + length > batch_size + chunk:
            full = rows - rows % batch_size
            ops += [("forward", lo, lo + batch_size) for lo in range(0, full, batch_size)]
            if rows > full:
                ops.append(("copy", full, 0, rows - full))  # full >= batch_size > rows - full
            yield ops
            rows, ops = rows - full, []
        ops.append(("noise", b, j, length, rows))
        rows += length
    ops += [("forward", lo, min(lo + batch_size, rows)) for lo in range(0, rows, batch_size)]
    yield ops


def _plan_split(num_inputs, n, batch_size, chunk) -> Iterator[list[tuple]]:
    size = batch_size
    pending = None  # (b, j, length, rows): the end of a chunk split by the previous batch
    whole: list[tuple] = []  # (b, j, length) of the batch's whole chunks
    rows = 0  # rows taken in the batch
    for b, j, length in _chunks(num_inputs, n, chunk):
        if rows + length <= size:
            whole.append((b, j, length))
            rows += length
            if rows == size:
                yield _layout(size, rows, pending, None, whole)
                pending, whole, rows = None, [], 0
            continue
        room = size - rows  # 0 < room < length
        tail = length - room
        if pending is None or pending[2] + room <= size or length + pending[3] <= size:
            yield _layout(size, size, pending, (b, j, length, room), whole)
            pending, whole, rows = (b, j, length, tail), [], tail
        else:  # no room to split this chunk: cut the batch short, the chunk opens the next
            yield _layout(size, rows, pending, None, whole)
            pending, whole, rows = None, [(b, j, length)], length
    if rows:
        yield _layout(size, rows, pending, None, whole)


def _layout(size, rows, pending, split, whole) -> list[tuple]:
    """Operations of one batch of ``rows`` rows: [split head][whole chunks][pending tail].

    A split chunk is drawn at row 0 (its head lands in place, the rest on whole-chunk rows);
    a pending chunk is drawn so that its tail ends at ``rows`` (its head on whole-chunk rows),
    or at the end of the buffer with a forward pass of its own when it does not fit there.
    """
    ops, first = [], 0
    tail_rows = pending[3] if pending else 0
    end_tail = None
    if pending:
        b, j, length, _ = pending
        if split and pending[2] + split[3] > size:  # tail first, then the split chunk
            ops.append(("noise", b, j, length, size - length))
        elif rows >= length:
            end_tail = ("noise", b, j, length, rows - length)
        else:  # a short last batch: the tail at the end of the buffer, classified apart
            ops.append(("noise", b, j, length, size - length))
    if split:
        b, j, length, first = split
        ops.append(("noise", b, j, length, 0))
    if end_tail:
        ops.append(end_tail)
    row = first
    for b, j, length in whole:
        ops.append(("noise", b, j, length, row))
        row += length
    if pending and not end_tail and not split:
        ops += [("forward", 0, row)] if row else []
        return ops + [("forward", size - tail_rows, size)]
    return ops + [("forward", 0, rows)]
