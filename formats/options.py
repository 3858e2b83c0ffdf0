"""Options every writer accepts, so adapters share one signature."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class WriteOptions:
    force: bool = False  # replace an existing destination
    shard_size: int | None = None  # bytes per shard (formats that shard)
    compression: str | None = None  # "gzip" or "lzf" (HDF5)
    progress: Callable[[int], None] | None = None  # called with bytes written so far, per tensor
    fsync: bool = False  # flush to disk before the rename: survives a power cut, costs time


DEFAULT_OPTIONS = WriteOptions()
