"""load / save / convert: the library calls behind ``nnconv convert``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnconv.formats import registry, sharding
from nnconv.formats.atomic import check_destination
from nnconv.formats.checkpoint import Checkpoint, cast, from_object
from nnconv.formats.errors import UsageError
from nnconv.formats.options import WriteOptions

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion did: formats, counts, bytes, and the cast if any."""

    source: str
    destination: str
    source_format: str
    destination_format: str
    tensors: int
    aliases: int
    nbytes: int
    dtype: str | None


def load(path: PathLike, *, format: str | None = None, trust_pickle: bool = False) -> Checkpoint:
    """Read a model file (any registered format) into a lazy :class:`Checkpoint`.

    ``format`` overrides detection by content and extension.  Call
    ``nnconv.formats.checkpoint.to_object(ckpt)`` for the Python object
    ``torch.load`` would give.
    """
    path = Path(path)
    return registry.detect(path, format=format).read(path, trust_pickle=trust_pickle)


def save(
    obj: Any,
    path: PathLike,
    *,
    format: str | None = None,
    force: bool = False,
    shard_size: int | str | None = None,
    compression: str | None = None,
    dtype: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write a :class:`Checkpoint` or a ``torch.save``-able object (tensor, list, dict,
    state_dict, training checkpoint) atomically in ``format`` (default: from the extension).
    """
    ckpt = obj if isinstance(obj, Checkpoint) else from_object(obj)
    if dtype:
        ckpt = cast(ckpt, dtype)
    adapter = registry.get(format) if format else registry.for_destination(path)
    if not adapter.CAN_WRITE:
        raise UsageError(path, f"nnconv can read {adapter.NAME} but not write it")
    if isinstance(shard_size, str):
        shard_size = sharding.parse_size(shard_size)
    options = WriteOptions(
        force=force, shard_size=shard_size, compression=compression, progress=progress
    )
    adapter.write(ckpt, Path(path), options=options)


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    dtype: str | None = None,
    shard_size: int | str | None = None,
    compression: str | None = None,
    force: bool = False,
    trust_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Convert ``src`` into ``dst`` losslessly (or cast floats to ``dtype``).

    The destination is written atomically and never equals the source.
    ``progress(done_bytes, total_bytes)`` is called as tensors are written.
    """
    src, dst = Path(src), Path(dst)
    # Resolve the destination format before reading anything: fail fast on typos.
    dst_adapter = registry.get(dst_format) if dst_format else registry.for_destination(dst)
    if shard_size and dst_adapter.NAME != "safetensors":
        raise UsageError(dst, "--shard-size applies to safetensors destinations only")
    if compression and dst_adapter.NAME != "hdf5":
        raise UsageError(dst, "--compression applies to hdf5 destinations only")
    check_destination(dst, force=force, sources=(src,))
    with load(src, format=src_format, trust_pickle=trust_pickle) as ckpt:
        total = ckpt.nbytes
        save(
            ckpt,
            dst,
            format=dst_adapter.NAME,
            force=force,
            shard_size=shard_size,
            compression=compression,
            dtype=dtype,
            progress=(lambda done: progress(done, total)) if progress else None,
        )
        return ConvertResult(
            source=str(src),
            destination=str(dst),
            source_format=ckpt.format or "",
            destination_format=dst_adapter.NAME,
            tensors=len(ckpt.tensors),
            aliases=len(ckpt.aliases),
            nbytes=total,
            dtype=dtype,
        )
