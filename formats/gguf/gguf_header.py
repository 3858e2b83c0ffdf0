"""The GGUF header, parsed with every field bounded.

One walk reads every count, length, type, dimension and offset, checks each against
the bytes the file really holds and against GGML's own limits (4 dimensions, whole
quantisation blocks, tensors inside the file without overlaps), and raises one
:class:`FormatError` naming the field: a hostile header costs time proportional to its
size, and nothing is allocated for a claim.  Key/values are decoded on the way, numeric
arrays in one numpy call each.

``gguf.GGUFReader`` (llama.cpp's reader, which the tests hold this parser to, field by
field) is not used to read: it trusts the counts (2^60 tensors is a loop until a read
runs off the map; dimensions multiply in wrapping uint64), and it makes numpy views per
array item, ~21 µs of CPU each: 15.7 s for a 150,000-token vocabulary with its scores,
types and 280,000 merges, against 0.9 s for this walk.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import INT64_MAX, check_count
from ..errors import FormatError, UnsupportedError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what gguf.GGUFReader reads (version 1 had 32-bit counts)
MAX_DIMS = 4  # GGML_MAX_DIMS
# Array items in all key/values together: the largest tokenizers (262,144 tokens with
# scores and types, ~500,000 merges) hold ~10^6; each item becomes a Python object.
MAX_ARRAY_ITEMS = 1 << 22
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
PSEUDO_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # GGUFReader's own
UINT32, STRING, ARRAY = 4, 8, 9
Buffer = bytes | memoryview | mmap.mmap
# GGUF value type -> (name, struct/numpy code); STRING and ARRAY are 8 and 9.
SCALARS = {
    0: ("UINT8", "B"),
    1: ("INT8", "b"),
    2: ("UINT16", "H"),
    3: ("INT16", "h"),
    4: ("UINT32", "I"),
    5: ("INT32", "i"),
    6: ("FLOAT32", "f"),
    7: ("BOOL", "?"),
    10: ("UINT64", "Q"),
    11: ("INT64", "q"),
    12: ("FLOAT64", "d"),
}
SCALAR_SIZES = {kind: struct.calcsize(code) for kind, (_, code) in SCALARS.items()}
MIN_KV_BYTES = 8 + 4 + 1  # key length, type, the smallest value
MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    dims: tuple[int, ...]  # GGUF order: dims[0] varies fastest (torch's last dimension)
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class Header:
    version: int
    alignment: int
    data_start: int
    values: dict[str, tuple[str, Any]] = field(default_factory=dict)  # key: (type, value)
    tensors: list[TensorInfo] = field(default_factory=list)


class _Cursor:
    def __init__(self, path: Path, data: Buffer, size: int) -> None:
        self.path, self.data, self.size, self.pos = path, data, size, 0

    def need(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise FormatError(
                self.path,
                f"truncated or corrupt GGUF: {what} at byte {self.pos} needs {n:,} bytes, "
                f"the file has {self.size - self.pos:,} left",
                remedy="the file is truncated or not GGUF",
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        value: int = struct.unpack_from("<I", self.data, self.need(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack_from("<Q", self.data, self.need(8, what))[0]
        return value

    def string(self, what: str) -> bytes:
        length = self.u64(f"{what} length")
        start = self.need(length, what)
        return bytes(self.data[start : start + length])

    def value(self, kind: int, what: str) -> Any:
        """One scalar (``kind`` in :data:`SCALARS`) or string (``kind`` STRING)."""
        if kind == STRING:
            return self.string(what).decode("utf-8", "replace")
        code = "<" + SCALARS[kind][1]
        return struct.unpack_from(code, self.data, self.need(SCALAR_SIZES[kind], what))[0]

    def text(self, what: str) -> str:
        try:
            return self.string(what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(self.path, f"{what} is not UTF-8 (at byte {exc.start})") from None

    def count(self, what: str, least_bytes: int) -> int:
        """A count of items of at least ``least_bytes`` each, bounded by what is left."""
        n = self.u64(what)
        self.bound(n, least_bytes, what)
        return n

    def bound(self, n: int, least_bytes: int, what: str) -> None:
        room = (self.size - self.pos) // least_bytes
        if n > room:
            raise FormatError(
                self.path,
                f"GGUF header claims {n:,} {what} but the rest of the "
                f"{self.size:,}-byte file can hold at most {room:,}",
                value=n,
                limit=room,
                remedy="the file is truncated, corrupt or crafted",
            )


def parse(path: Path, data: Buffer, sizes: dict[int, tuple[int, int]]) -> Header:
    """The header of the GGUF file ``data`` (its whole mapped bytes), checked; ``sizes``
    is gguf's ``GGML_QUANT_SIZES`` by type number: (block size, bytes per block)."""
    cur = _Cursor(path, data, len(data))
    if bytes(data[:4]) != MAGIC:
        raise FormatError(path, "not a GGUF file: no GGUF magic")
    cur.need(4, "magic")
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version:
        raise UnsupportedError(path, "big-endian GGUF files are not supported")
    if version not in VERSIONS:
        raise UnsupportedError(
            path, f"GGUF version {version} is not supported", remedy="nnconv reads versions 2, 3"
        )
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("key/value count")
    cur.bound(n_tensors, MIN_TENSOR_BYTES, "tensors")
    cur.bound(n_kv, MIN_KV_BYTES, "key/values")
    check_count(str(path), n_tensors)
    header = Header(version, DEFAULT_ALIGNMENT, 0)
    seen: set[str] = set(PSEUDO_KEYS)
    items = 0
    for _ in range(n_kv):
        key = cur.text("key")
        if key in seen:
            raise FormatError(path, f"key {key!r} appears twice (or is reserved)")
        seen.add(key)
        kind = cur.u32(f"type of {key!r}")
        if key == ALIGNMENT_KEY:
            header.alignment = _alignment(cur, key, kind)
            continue
        spec, value, n = _value(cur, key, kind, MAX_ARRAY_ITEMS - items)
        header.values[key] = (spec, value)
        items += n
        if items > MAX_ARRAY_ITEMS:
            raise FormatError(
                path,
                f"key/value arrays hold more than {MAX_ARRAY_ITEMS:,} items",
                limit=MAX_ARRAY_ITEMS,
                remedy="the file is corrupt or crafted",
            )
    infos = [_tensor_info(cur, sizes) for _ in range(n_tensors)]
    header.data_start = -(-cur.pos // header.alignment) * header.alignment
    _place(path, header, infos, cur.size)
    return header


def _alignment(cur: _Cursor, key: str, kind: int) -> int:
    if kind != UINT32:
        raise FormatError(cur.path, f"{key} must be a UINT32")
    value = cur.u32(key)
    if value == 0 or value & (value - 1):
        raise FormatError(cur.path, f"{key} is {value}, not a power of two")
    return value


def _value(cur: _Cursor, key: str, kind: int, room: int) -> tuple[str, Any, int]:
    """(type name, value, array items) of one key/value; arrays over ``room`` items are
    counted, not decoded (the caller refuses them)."""
    if kind in SCALARS or kind == STRING:
        return ("STRING" if kind == STRING else SCALARS[kind][0]), cur.value(kind, key), 0
    if kind != ARRAY:
        raise FormatError(cur.path, f"key {key!r} has unknown value type {kind}")
    item = cur.u32(f"item type of {key!r}")
    if item == ARRAY:
        raise UnsupportedError(cur.path, f"key {key!r} is an array of arrays (nested arrays)")
    if item != STRING and item not in SCALARS:
        raise FormatError(cur.path, f"key {key!r} has unknown item type {item}")
    least = SCALAR_SIZES.get(item, 8)
    n = cur.count(f"items in {key!r}", least)
    spec = f"ARRAY[{'STRING' if item == STRING else SCALARS[item][0]}]"
    if n > room:
        return spec, None, n
    if item == STRING:
        return spec, [cur.value(STRING, f"item of {key!r}") for _ in range(n)], n
    start = cur.need(n * least, f"items of {key!r}")
    values = np.frombuffer(cur.data, "<" + SCALARS[item][1], n, start).tolist()
    return spec, values, n


def _tensor_info(cur: _Cursor, sizes: dict[int, tuple[int, int]]) -> TensorInfo:
    name = cur.text("tensor name")
    n_dims = cur.u32(f"dimensions of {name!r}")
    if n_dims > MAX_DIMS:
        raise FormatError(
            cur.path,
            f"tensor {name!r} has {n_dims} dimensions, GGUF allows {MAX_DIMS}",
            value=n_dims,
            limit=MAX_DIMS,
        )
    dims = tuple(cur.u64(f"dimension of {name!r}") for _ in range(n_dims))
    numel = 1
    for d in dims:
        numel *= d
    if numel > INT64_MAX or any(d > INT64_MAX for d in dims):
        raise FormatError(
            cur.path,
            f"tensor {name!r}: dimensions {list(dims)} overflow 64-bit sizes",
            limit=INT64_MAX,
            remedy="the file is corrupt or crafted",
        )
    kind = cur.u32(f"type of {name!r}")
    if kind not in sizes:
        raise FormatError(
            cur.path,
            f"tensor {name!r} has unknown GGML type {kind}",
            remedy="a newer llama.cpp type? pip install -U gguf",
        )
    block, type_size = sizes[kind]
    if (dims[0] if dims else 1) % block:
        raise FormatError(
            cur.path,
            f"tensor {name!r}: rows of {dims[0] if dims else 1} are not whole blocks of {block}",
        )
    offset = cur.u64(f"data offset of {name!r}")
    return TensorInfo(name, kind, dims, offset, numel // block * type_size)


def _place(path: Path, header: Header, infos: list[TensorInfo], size: int) -> None:
    """Absolute offsets, each tensor inside the file, names unique, no two overlapping."""
    room = size - header.data_start
    names: set[str] = set()
    for info in infos:
        if info.name in names:
            raise FormatError(path, f"tensor {info.name!r} appears twice")
        names.add(info.name)
        if info.offset > room or info.nbytes > room - info.offset:
            raise FormatError(
                path,
                f"tensor {info.name!r}: its {info.nbytes:,} bytes at data offset "
                f"{info.offset:,} lie past the end of the {size:,}-byte file",
                remedy="the file is truncated or corrupt",
            )
        header.tensors.append(
            TensorInfo(
                info.name, info.ggml_type, info.dims, header.data_start + info.offset, info.nbytes
            )
        )
    end, previous = 0, ""
    for info in sorted((t for t in header.tensors if t.nbytes), key=lambda t: t.offset):
        if info.offset < end:
            raise FormatError(path, f"tensor {info.name!r} overlaps tensor {previous!r}")
        end, previous = info.offset + info.nbytes, info.name
