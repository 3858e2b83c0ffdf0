"""Option groups shared by the CLI, ``convert`` and ``verify``: each a small frozen
dataclass, filled from keywords in one place and checked where the capability is
declared (write options against the destination format, in the registry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from nnconv.formats import sharding
from nnconv.formats.options import WriteOptions

from .export import EXTERNAL_DATA_THRESHOLD


@dataclass(frozen=True)
class OnnxOptions:
    """How to export to ONNX, and how strictly to map ONNX initializers back."""

    opset: int | None = None
    dynamic_batch: bool = True  # the first dimension is symbolic in the graph
    exporter: str = "auto"  # "auto" (dynamo, then TorchScript) | "dynamo" | "torchscript"
    optimize: bool = False  # let the exporter fold constants (changes parameters)
    allow_missing: bool = False  # ONNX import: leave out keys that cannot be recovered
    with_past: bool = False  # HF decoder LMs: past key/values as inputs and outputs
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD



def onnx_options(
    onnx: OnnxOptions | None,
    opset: int | None,
    dynamic_batch: bool | None,
    exporter: str | None,
    optimize: bool | None,
    allow_missing: bool | None,
    with_past: bool | None = None,
) -> OnnxOptions:
    """One :class:`OnnxOptions` from the object and the keywords (which win where given)."""
    given: dict[str, Any] = dict(
        opset=opset,
        dynamic_batch=dynamic_batch,
        exporter=exporter,
        optimize=optimize,
        allow_missing=allow_missing,
        with_past=with_past,
    )
    return replace(onnx or OnnxOptions(), **{k: v for k, v in given.items() if v is not None})


def write_options(
    force: bool,
    shard_size: int | str | None,
    compression: str | None,
    fsync: bool,
    progress: Callable[[int], None] | None = None,
) -> WriteOptions:
    """The write options, sizes parsed once (``--shard-size 2GB``)."""
    if isinstance(shard_size, str):
        shard_size = sharding.parse_size(shard_size)
    return WriteOptions(
        force=force, shard_size=shard_size, compression=compression, progress=progress, fsync=fsync
    )
