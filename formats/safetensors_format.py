"""safetensors: single files and Hugging Face sharded folders.

The header is parsed here (it is 8 bytes of length and a JSON object), with
every field bounded, so listing a file reads only its header and needs no
torch.  Tensors are views into a private memory map of the file, and writing
streams one tensor at a time: no step holds a second copy of the model.
safetensors cannot give one storage two names, so tied weights are stored
once and the alias is recorded in ``__metadata__``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from . import dtypes, rawio, sharding
from .atomic import atomic_output
from .checkpoint import Checkpoint, LazyTensor, Span, from_records, paused_gc
from .errors import FormatError, UnsupportedError
from .options import DEFAULT_OPTIONS, WriteOptions

NAME = "safetensors"
EXTENSIONS = (".safetensors", ".safetensors.index.json")
DESCRIPTION = "safetensors, single file or Hugging Face sharded folder (--shard-size)"
CAN_WRITE = True
FEATURES = "flat tensors; containers, aliases and metadata kept in __metadata__"

MAX_HEADER = 100_000_000  # the reference implementation's limit
ALIGNMENT = 8


def sniff(path: Path, head: bytes) -> bool:
    if path.is_dir():
        return (path / sharding.INDEX_NAME).is_file() or any(path.glob("*.safetensors"))
    if path.name.endswith(".safetensors.index.json"):
        return True
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= MAX_HEADER


def read_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """(entries in header order, __metadata__, data start) with every field checked."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise FormatError(path, f"truncated: {size} bytes, no safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER or length > size - 8:
                raise FormatError(
                    path,
                    f"header length {length} exceeds "
                    + ("the 100 MB limit" if length > MAX_HEADER else f"the file size {size}"),
                    value=length,
                    limit=min(MAX_HEADER, size - 8),
                    remedy="the file is truncated or not safetensors",
                )
            raw = fh.read(length)
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(path, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(path, "__metadata__ must map strings to strings")
    start = 8 + length
    _check_entries(path, header, size - start)
    return header, metadata, start


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in header")
    return out


def _check_entries(path: Path, header: dict, data_size: int) -> None:
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise FormatError(path, f"tensor {name!r}: header entry is not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if code not in dtypes.BY_SAFETENSORS:
            raise FormatError(path, f"tensor {name!r}: unknown dtype {code!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise FormatError(path, f"tensor {name!r}: invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise FormatError(
                path,
                f"tensor {name!r}: data offsets {offsets!r} fall outside the "
                f"{data_size}-byte data section",
                remedy="the file is truncated or corrupt",
            )
        expected = dtypes.numel(tuple(shape)) * dtypes.BY_SAFETENSORS[code].itemsize
        if offsets[1] - offsets[0] != expected:
            raise FormatError(
                path,
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes stored, shape {shape} "
                f"{code} needs {expected}",
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            problem = "overlaps the previous tensor" if begin < end else f"leaves a gap at {end}"
            raise FormatError(path, f"tensor {name!r} {problem}")
        end = stop
    if end != data_size:
        raise FormatError(path, f"data section has {data_size - end} bytes no tensor covers")


def _read_file(path: Path, ckpt: Checkpoint, weight_map: dict | None = None) -> dict[str, str]:
    header, metadata, start = read_header(path)
    mapping = rawio.MappedFile(path)  # tensors alive keep it open; it closes with the last
    for name, entry in header.items():
        if weight_map is not None and weight_map.get(name) != path.name:
            where = weight_map.get(name)
            problem = f"the index puts it in {where!r}" if where else "the index does not list it"
            raise FormatError(path, f"tensor {name!r} is in this shard but {problem}")
        if name in ckpt.tensors:
            raise FormatError(path, f"tensor {name!r} appears in more than one shard")
        dtype = dtypes.BY_SAFETENSORS[entry["dtype"]].name
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        ckpt.tensors[name] = LazyTensor(
            dtype,
            shape,
            lambda d=dtype, s=shape, o=start + begin, n=end - begin: mapping.tensor(d, s, o, n),
            span=Span(str(path), start + begin, end - begin),
        )
    return metadata


def _read_index(path: Path) -> tuple[Path, dict]:
    try:
        index = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(path, f"unreadable shard index: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(path, "shard index has no weight_map object")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise FormatError(path, f"weight_map entry {bad!r} does not name a shard file")
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise FormatError(path, "shard index metadata is not an object")
    return path.parent, index


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for names no file can have (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


@paused_gc()
def read(path: Path, *, trust_code: bool = False) -> Checkpoint:
    path = Path(path)
    ckpt = Checkpoint(tensors={}, structure=None, format=NAME, source=str(path))
    index_path = path / sharding.INDEX_NAME if path.is_dir() else path
    if path.is_dir() and not index_path.is_file():
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) != 1:
            raise FormatError(
                path, f"folder has no {sharding.INDEX_NAME} and {len(singles)} .safetensors files"
            )
        index_path = singles[0]
    if index_path.name.endswith(".index.json"):
        folder, index = _read_index(index_path)
        records = {k: v for k, v in (index.get("metadata") or {}).items() if isinstance(v, str)}
        by_shard: dict[str, set[str]] = {}
        for name, shard in index["weight_map"].items():
            by_shard.setdefault(shard, set()).add(name)
        for shard, names in by_shard.items():
            shard_path = folder / shard
            if Path(shard).name != shard or not _is_file(shard_path):
                raise FormatError(
                    index_path, f"shard {shard!r} (holding e.g. {sorted(names)[0]!r}) is missing"
                )
            _read_file(shard_path, ckpt, index["weight_map"])
            absent = sorted(names - set(ckpt.tensors))
            if absent:
                raise FormatError(
                    index_path,
                    f"index puts tensor {absent[0]!r} in shard {shard!r}, which does not hold it",
                )
        # Keep the index's order, which is the order the names were written in.
        ckpt.tensors = {n: ckpt.tensors[n] for n in index["weight_map"]}
    else:
        records = _read_file(index_path, ckpt)
    if records.get("format") == "pt":
        records = {k: v for k, v in records.items() if k != "format"}  # HF's marker, not data
    ckpt.structure, ckpt.aliases, ckpt.metadata = from_records(
        str(path), records, list(ckpt.tensors)
    )
    return ckpt


def _write_file(
    path: Path,
    ckpt: Checkpoint,
    names: list[str],
    metadata: dict[str, str],
    reader: rawio.SpanReader,
    progress,
    done: int,
) -> int:
    """One file: the header, then each tensor's bytes placed at its offset."""
    header: dict = {"__metadata__": metadata}
    placed, offset = [], 0  # (name, lazy tensor, offset in the data section)
    for name in names:
        lazy = ckpt.tensors[name]
        nbytes = lazy.nbytes
        header[name] = {
            "dtype": dtypes.DTYPES[lazy.dtype].safetensors,
            "shape": list(lazy.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        placed.append((name, lazy, offset))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % ALIGNMENT)
    start = 8 + len(raw)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with rawio.Placer(reader, fd) as placer:
            placer.put(0, struct.pack("<Q", len(raw)) + raw)
            for name, lazy, at in placed:
                placer.tensor(start + at, lazy, name=name)
                if progress:
                    progress(done + at + lazy.nbytes)
        os.ftruncate(fd, start + offset)  # a tensor-less tail still has its length
    finally:
        os.close(fd)
    return done + offset


@paused_gc()
def write(ckpt: Checkpoint, path: Path, *, options: WriteOptions = DEFAULT_OPTIONS) -> None:
    if options.compression:
        raise UnsupportedError(path, "safetensors has no compression; --compression is for hdf5")
    path = Path(path)
    if "__metadata__" in ckpt.tensors:
        raise UnsupportedError(
            path, "a tensor named '__metadata__' cannot be stored in safetensors (reserved key)"
        )
    for name, lazy in ckpt.tensors.items():
        if dtypes.DTYPES[lazy.dtype].safetensors is None:
            raise UnsupportedError(
                path,
                f"tensor {name!r}: safetensors cannot hold {lazy.dtype}",
                remedy="convert to pt or hdf5, or cast with --dtype",
            )
    records = {"format": "pt", **ckpt.records()}
    if not options.shard_size:
        with (
            atomic_output(path, force=options.force, fsync=options.fsync) as tmp,
            rawio.SpanReader() as reader,
        ):
            _write_file(tmp, ckpt, list(ckpt.tensors), records, reader, options.progress, 0)
        return
    sizes = [(n, t.nbytes) for n, t in ckpt.tensors.items()]
    shards = sharding.plan(sizes, options.shard_size)
    index = sharding.build_index(shards, ckpt.nbytes, ckpt.records())
    shard_meta = {"format": "pt"}  # nnconv's records live in the index
    with (
        atomic_output(path, force=options.force, directory=True, fsync=options.fsync) as tmp,
        rawio.SpanReader() as reader,
    ):
        done = 0
        for i, names in enumerate(shards):
            done = _write_file(
                tmp / sharding.shard_name(i, len(shards)),
                ckpt,
                names,
                shard_meta,
                reader,
                options.progress,
                done,
            )
        (tmp / sharding.INDEX_NAME).write_text(json.dumps(index, indent=2, ensure_ascii=False))
