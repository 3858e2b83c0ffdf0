"""safetensors: single files and Hugging Face sharded folders.

The header is parsed here (it is 8 bytes of length and a JSON object), with
every field bounded, so listing a file reads only its header and needs no
torch.  Tensors are views into a private memory map of the file, and writing
streams one tensor at a time: no step holds a second copy of the model.
safetensors cannot give one storage two names, so tied weights are stored
once and the alias is recorded in ``__metadata__``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from .. import dtypes, paths, rawio, sharding
from ..adapter import Capabilities
from ..atomic import atomic_files, atomic_output, is_sharded_output
from ..checkpoint import INT64_MAX, Checkpoint, LazyTensor, Span, from_records, paused_gc
from ..errors import FormatError, UnsupportedError
from ..options import DEFAULT_OPTIONS, WriteOptions

NAME = "safetensors"
EXTENSIONS = (".safetensors", ".safetensors.index.json")
DESCRIPTION = "safetensors, single file or Hugging Face sharded folder (--shard-size)"
CAPABILITIES = Capabilities(
    writes=True,
    write_options=frozenset({"shard_size"}),
    dtypes=frozenset(name for name, d in dtypes.DTYPES.items() if d.safetensors),
    reserved_names=frozenset({"__metadata__"}),  # the header's metadata key
)
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


def read_header(
    path: Path, *, expect: os.stat_result | None = None
) -> tuple[dict, dict[str, str], int]:
    """(entries in header order, __metadata__, data start) with every field checked.

    Only a regular file is opened (``expect``: the very file a containment check
    stat'ed), and no error quotes the file's bytes: a shard may be any file.
    """
    try:
        with os.fdopen(paths.open_regular(path, expect), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise FormatError(path, f"truncated: {size} bytes, no safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER or length > size - 8:
                # The 8 bytes are not quoted, not even as a number: they may be a secret.
                raise FormatError(
                    path,
                    "not a safetensors file: header length field "
                    + (
                        "exceeds the 100 MB limit"
                        if length > MAX_HEADER
                        else f"is larger than the {size}-byte file"
                    ),
                    limit=min(MAX_HEADER, size - 8),
                    remedy="the file is truncated or not safetensors",
                )
            raw = fh.read(length)
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"header is not UTF-8 (at byte {8 + exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(path, f"header is not valid JSON: {sharding.json_problem(exc)}") from None
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
        if not isinstance(code, str) or code not in dtypes.BY_SAFETENSORS:
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
        itemsize = dtypes.BY_SAFETENSORS[code].itemsize
        expected = dtypes.numel(tuple(shape)) * itemsize
        # An empty tensor stores nothing, yet torch cannot make one whose dimensions
        # or size (zeros aside) overflow int64; a non-empty one is bounded by the file.
        if not expected and dtypes.numel(tuple(d or 1 for d in shape)) * itemsize > INT64_MAX:
            raise FormatError(
                path,
                f"tensor {name!r}: shape {shape} overflows 64-bit sizes",
                limit=INT64_MAX,
                remedy="the file is corrupt or crafted",
            )
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


def _read_file(
    path: Path,
    ckpt: Checkpoint,
    weight_map: dict | None = None,
    *,
    shard: str | None = None,
    target: Path | None = None,
    expect: os.stat_result | None = None,
) -> dict[str, str]:
    """Add one file's tensors to ``ckpt``.  ``path`` names it in messages, ``shard`` in
    the index; ``target`` is the checked real file read (default: ``path``)."""
    target = target or path
    try:
        header, metadata, start = read_header(target, expect=expect)
    except FormatError as exc:
        if target == path:
            raise
        raise FormatError(
            path, exc.problem, value=exc.value, limit=exc.limit, remedy=exc.remedy
        ) from None
    mapping = rawio.MappedFile(target)  # tensors alive keep it open; it closes with the last
    for name, entry in header.items():
        if weight_map is not None and weight_map.get(name) != (shard or path.name):
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
            span=Span(str(target), start + begin, end - begin),
        )
    return metadata


@paused_gc()
def read(path: Path, *, trust_code: bool = False) -> Checkpoint:
    path = Path(path)
    ckpt = Checkpoint(tensors={}, structure=None, format=NAME, source=str(path))
    named = paths.check_input(path)  # a FIFO or a device is never opened
    index_path, target, checked = path, path, named
    if stat.S_ISDIR(named.st_mode):
        entry = sharding.INDEX_NAME
        if not os.path.lexists(path / entry):
            singles = sorted(p.name for p in path.glob("*.safetensors"))
            if len(singles) != 1:
                problem = f"has no {sharding.INDEX_NAME} and {len(singles)} .safetensors files"
                raise FormatError(path, f"folder {problem}")
            entry = singles[0]
        index_path = path / entry
        what = "index" if entry.endswith("json") else "file"
        target, checked = sharding.member(path, entry, path, what)
    if index_path.name.endswith(".index.json"):
        _, index = sharding.read_index(target, checked)
        folder = index_path.parent  # the folder the user's path names, symlinks not followed
        records = {k: v for k, v in (index.get("metadata") or {}).items() if isinstance(v, str)}
        by_shard: dict[str, set[str]] = {}
        for name, shard in index["weight_map"].items():
            by_shard.setdefault(shard, set()).add(name)
        for shard, names in by_shard.items():
            real, st = sharding.member(folder, shard, index_path, "shard")
            _read_file(
                folder / shard, ckpt, index["weight_map"], shard=shard, target=real, expect=st
            )
            absent = sorted(names - set(ckpt.tensors))
            if absent:
                raise FormatError(
                    index_path,
                    f"index puts tensor {absent[0]!r} in shard {shard!r}, which does not hold it",
                )
        # Keep the index's order, which is the order the names were written in.
        ckpt.tensors = {n: ckpt.tensors[n] for n in index["weight_map"]}
    else:
        records = _read_file(index_path, ckpt, target=target, expect=checked)
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
        rawio.preallocate(fd, start + offset)
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
    shard_size = sharding.shard_size_for(path, options.shard_size)
    if not shard_size:
        with (
            atomic_output(path, force=options.force, fsync=options.fsync) as tmp,
            rawio.SpanReader() as reader,
        ):
            _write_file(tmp, ckpt, list(ckpt.tensors), records, reader, options.progress, 0)
        return
    sizes = [(n, t.nbytes) for n, t in ckpt.tensors.items()]
    shards = sharding.plan(sizes, shard_size)
    index = sharding.build_index(shards, ckpt.nbytes, ckpt.records())
    shard_meta = {"format": "pt"}  # nnconv's records live in the index
    names = [sharding.shard_name(i, len(shards)) for i in range(len(shards))]
    with (
        _shard_outputs(path, [*names, sharding.INDEX_NAME], options) as files,
        rawio.SpanReader() as reader,
    ):
        done = 0
        for name, group in zip(names, shards, strict=True):
            done = _write_file(files[name], ckpt, group, shard_meta, reader, options.progress, done)
        files[sharding.INDEX_NAME].write_text(json.dumps(index, indent=2, ensure_ascii=False))


@contextlib.contextmanager
def _shard_outputs(path: Path, names: list[str], options: WriteOptions) -> Iterator[dict]:
    """Where each shard and the index (last) are written.  A new folder, or an earlier
    sharded output replaced with --force, is written whole and swapped in; an existing
    folder holding anything else is written into (as save_pretrained does), replacing
    only an earlier output's shards and index, never the user's other files."""
    if path.is_dir() and (path.is_symlink() or not is_sharded_output(path)):
        with atomic_files(
            path,
            names,
            replaces=sharding.is_output_name,
            force=options.force,
            fsync=options.fsync,
        ) as files:
            yield files
    else:
        with atomic_output(path, force=options.force, directory=True, fsync=options.fsync) as tmp:
            yield {name: tmp / name for name in names}
