"""Read back what W&B wrote offline: the history rows, metric definitions and config of a
``run-*.wandb`` file.

The file is a LevelDB-style log (7-byte W&B header, 32 KiB blocks, each record a 7-byte
header ``crc32 (4) | length (2) | type (1)`` and a piece of a protobuf ``Record``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _raw_records(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # block trailer: too short for a header
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        piece = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield piece
        elif kind == _FIRST:
            pending = piece
        elif kind == _MIDDLE:
            pending += piece
        elif kind == _LAST:
            yield pending + piece
        elif kind == 0 and length == 0:  # zero padding up to the block end
            pos += (_BLOCK - pos % _BLOCK) % _BLOCK


def history(run_file: str | Path) -> list[dict]:
    """Every logged history row, as ``{key: value}``."""
    rows = []
    for raw in _raw_records(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def metrics(run_file: str | Path) -> dict[str, str]:
    """The ``define_metric`` definitions: the step metric of each name (or glob) defined."""
    out = {}
    for raw in _raw_records(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "metric":
            out[record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return out


def config(run_file: str | Path) -> dict:
    """The run config as W&B recorded it (later updates win)."""
    out = {}
    for raw in _raw_records(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                out[item.key] = json.loads(item.value_json)
    return out
