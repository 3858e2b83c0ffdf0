"""torch.save's zip container, indexed and written byte by byte, without torch.

``torch.save`` writes an uncompressed zip: ``<prefix>/data.pkl`` (the object,
with tensors as references to storages), one ``<prefix>/data/<key>`` record
per storage (raw little-endian bytes, 64-byte aligned) and a few small
records.  Reading the index and writing that layout here lets a conversion
move tensor bytes with kernel copies, at the speed of ``cp``, and lets
``inspect`` list a ``.pt`` file without importing torch (~1.3 s).  The
output is checked against ``torch.load`` and ``zipfile`` by the tests.
"""

from __future__ import annotations

import functools
import mmap
import os
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from . import dtypes, torchpickle
from .checkpoint import INT64_MAX, VIEW_SLACK, LazyTensor, Span, check_expansion
from .errors import FormatError
from .rawio import Placer, preallocate

ALIGNMENT = 64  # torch's record alignment (so that records can be memory-mapped)
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets at or above this need zip64 fields
MASK32, MASK16 = 0xFFFFFFFF, 0xFFFF  # what a 32/16-bit field holds when zip64 has the value
LOCAL = struct.Struct("<IHHHHHIIIHH")
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
# The central fields a reader needs: signature, flags, method, sizes, name/extra/comment
# lengths, local header offset.
CENTRAL_FIELDS = struct.Struct("<4s4xHH8xIIHHH8xI")
# The local header fields checked against the central directory: signature, flags,
# method, sizes, name and extra lengths.
LOCAL_FIELDS = struct.Struct("<I2xHH8xIIHH")
END = struct.Struct("<IHHHHIIH")
END64 = struct.Struct("<IQHHIIQQQQ")
LOCATOR64 = struct.Struct("<IIQI")
PAD_ID = 0x4246  # "FB": the padding extra field torch uses to align records
DOS_DATE = 0x21  # 1980-01-01, the zip epoch: files come out the same for the same input


class Record(NamedTuple):
    """One zip member: where its local header is, its size, whether it is stored, and
    what its local header must repeat (method, compressed size, name length)."""

    name: str
    header: int
    size: int
    stored: bool
    method: int = zipfile.ZIP_STORED
    csize: int = 0
    nlen: int = 0


def members(path: Path) -> dict[str, Record]:
    """The archive's members from its central directory, parsed here with every field
    bounded by the file size: ``zipfile`` builds a ZipInfo per member (~10 µs each),
    which a checkpoint of 50,000 tensors would pay on every open."""
    stat = os.stat(path)
    return _members(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=4)  # sniff, the TorchScript check and read share one parse
def _members(path: str, size: int, _mtime: int, _inode: int) -> dict[str, Record]:
    """One reading of the archive for every reader (the pickle gate, nnconv's unpickler,
    torch): names unique even ignoring case (torch's miniz looks names up that way), one
    ``data.pkl``, in the folder torch takes from the first member's name."""

    def bad(problem: str) -> FormatError:
        return FormatError(path, f"corrupt or truncated zip archive: {problem}")

    with open(path, "rb") as fh:
        tail_start = max(0, size - END.size - MASK16)
        fh.seek(tail_start)
        tail = fh.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < END.size:
            raise bad("no end of central directory")
        _, _, _, _, count, cd_size, cd_start, _ = END.unpack_from(tail, at)
        if MASK16 in (count,) or MASK32 in (cd_size, cd_start):
            if at < LOCATOR64.size or tail[at - LOCATOR64.size : at - 16] != b"PK\x06\x07":
                raise bad("zip64 fields without a zip64 locator")
            (end64,) = struct.unpack_from("<Q", tail, at - LOCATOR64.size + 8)
            fh.seek(end64)
            raw = fh.read(END64.size)
            if len(raw) < END64.size or raw[:4] != b"PK\x06\x06":
                raise bad("bad zip64 end record")
            *_, count, cd_size, cd_start = END64.unpack(raw)
        if cd_start + cd_size > size or count * CENTRAL.size > cd_size:
            raise bad(f"central directory of {count} entries does not fit the file")
        fh.seek(cd_start)
        cd = fh.read(cd_size)
    out, pos, size_cd = {}, 0, len(cd)
    end = size_cd - CENTRAL.size
    unpack = CENTRAL_FIELDS.unpack_from
    for _ in range(count):
        if pos > end:
            raise bad("central directory ends early")
        sig, flags, method, csize, usize, nlen, elen, clen, header = unpack(cd, pos)
        if sig != b"PK\x01\x02":
            raise bad("bad central directory entry")
        name_at = pos + CENTRAL.size
        pos = name_at + nlen + elen + clen
        if pos > size_cd:
            raise bad("central directory entry runs past its end")
        if MASK32 in (csize, usize, header):
            extra = cd[name_at + nlen : name_at + nlen + elen]
            usize, csize, header = _zip64(extra, usize, csize, header, bad)
        try:
            name = _decode(cd[name_at : name_at + nlen], flags)
        except UnicodeDecodeError:
            raise bad("a member name is not valid UTF-8") from None
        if header + LOCAL.size + csize > size:
            raise bad(f"member {name!r} claims {csize} bytes at offset {header}")
        if name in out:
            raise FormatError(path, f"zip archive names member {name!r} twice")
        stored = method == zipfile.ZIP_STORED and not flags & 1 and usize == csize
        out[name] = Record(name, header, usize, stored, method, csize, nlen)
    _check_names(path, out)
    return out


def _check_names(path: str, out: dict[str, Record]) -> None:
    """Names unique ignoring case (torch's miniz looks them up so), and at most one
    ``data.pkl``, the one torch reads: in bulk (C loops), as this runs for every member."""
    folded = "\n".join(map(str.lower, out)) + "\n"
    if len(set(folded.split("\n"))) != len(out) + 1:
        seen: set[str] = set()
        for name in out:
            if name.lower() in seen:
                raise FormatError(path, f"zip archive names member {name!r} twice, up to case")
            seen.add(name.lower())
    if "data.pkl\n" not in folded:
        return
    pickles = [n for n in out if n.lower().endswith("data.pkl")]
    folder = next(iter(out)).split("/", 1)[0] + "/"  # torch's archive name: the first's
    if pickles != [folder + "data.pkl"]:
        raise FormatError(
            path,
            f"zip archive holds {', '.join(map(repr, pickles))}: torch reads only "
            f"{folder + 'data.pkl'!r}",
            remedy="the file is corrupt or crafted",
        )


def _decode(raw: bytes, flags: int) -> str:
    return raw.decode("utf-8" if flags & 0x800 else "cp437")


def check_local_names(path: str, heads, members: dict[str, Record]) -> None:
    """Every member's local header names it as the central directory does (``zipfile``
    refuses a mismatch; torch and :func:`data_offset` use the central name and the
    local lengths, which :func:`data_offset` checks)."""
    for record in members.values():
        data_offset(path, heads, record)
        at = record.header + LOCAL.size
        flags = LOCAL_FIELDS.unpack_from(heads, record.header)[1]
        try:
            same = _decode(heads[at : at + record.nlen], flags) == record.name
        except UnicodeDecodeError:
            same = False
        if not same:
            raise FormatError(
                path,
                f"member {record.name!r}: its local header disagrees with the central "
                "directory (name)",
                remedy="the file is corrupt or crafted",
            )


def _zip64(extra: bytes, usize: int, csize: int, header: int, bad) -> tuple[int, int, int]:
    """Sizes and offset from the zip64 extra field, for those the 32-bit fields mask."""
    pos = 0
    while pos + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + length > len(extra):
            break
        if kind == 1:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            wanted = [v == MASK32 for v in (usize, csize, header)]
            if sum(wanted) > len(values):
                raise bad("zip64 extra field is too short")
            usize, csize, header = (
                values.pop(0) if w else v
                for w, v in zip(wanted, (usize, csize, header), strict=True)
            )
            return usize, csize, header
        pos += 4 + length
    raise bad("32-bit size or offset masked but no zip64 extra field")


def data_offset(path: str, heads, record: Record) -> int:
    """Where a member's bytes start: after its local header's own name and extra field
    (``heads``: the archive, memory-mapped); the bytes must lie inside the file, and the
    local header must agree with the central directory (name length, method, sizes: 0
    with a data descriptor, or masked for zip64).  (Called once per tensor: kept lean.)"""
    at = record.header
    try:
        sig, flags, method, csize, usize, name_len, extra_len = LOCAL_FIELDS.unpack_from(heads, at)
    except struct.error:
        raise FormatError(path, f"member {record.name!r}: bad local header") from None
    start = at + LOCAL.size + name_len + extra_len
    sizes = csize | usize  # 0: a data descriptor follows (torch.save's way)
    if (
        sig != 0x04034B50
        or method != record.method
        or name_len != record.nlen
        or sizes
        and (csize != record.csize or usize != record.size)
        and MASK32 not in (csize, usize)
        or not (sizes or flags & 8 or record.csize | record.size == 0)
    ):
        raise FormatError(
            path,
            f"member {record.name!r}: its local header disagrees with the central directory "
            "(name, method or sizes)",
            remedy="the file is corrupt or crafted",
        )
    if start + (record.size if record.stored else record.csize) > len(heads):
        raise FormatError(path, f"member {record.name!r} runs past the end of the file")
    return start


def member_bytes(path: str, heads, record: Record, *, limit: int) -> bytes:
    """A member's bytes from the mapped archive, inflated when deflated, never more than
    ``limit`` bytes (what its record claims is checked, and the output capped)."""

    def bad(problem: str) -> FormatError:
        return FormatError(path, f"record {record.name!r} {problem}", limit=limit)

    if record.size > limit or record.method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise bad(f"claims {record.size} bytes in {record.csize}, method {record.method}")
    start = data_offset(path, heads, record)
    raw = heads[start : start + (record.size if record.stored else record.csize)]
    try:
        data = raw if record.stored else zlib.decompressobj(-15).decompress(raw, record.size)
    except zlib.error as exc:
        raise bad(f"is corrupt: {exc}") from None
    if len(data) != record.size:
        raise bad("holds fewer bytes than it claims")
    return data


@dataclass
class Entry:
    """A member nnconv writes: stored, its bytes placed at ``data`` after a padded header."""

    name: bytes
    header: int  # offset of the local header
    data: int  # offset of the data
    size: int
    crc: int = 0
    flags: int = 0  # 0x800: the name is UTF-8 (npz); torch writes ASCII names


def _extra64(*values: int) -> bytes:
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""


def _layout(names: list[str], sizes: list[int]) -> tuple[list[Entry], int]:
    """Place every record: local header, zip64 sizes where needed, padding to 64 bytes."""
    entries, pos = [], 0
    for name, size in zip(names, sizes, strict=True):
        raw = name.encode()
        fixed = LOCAL.size + len(raw) + (20 if size >= ZIP64_LIMIT else 0)
        pad = -(pos + fixed + 4) % ALIGNMENT + 4  # a padding field is at least its 4-byte head
        entries.append(Entry(raw, pos, pos + fixed + pad, size))
        pos = pos + fixed + pad + size
    return entries, pos


def local_header(entry: Entry, *, pad_id: int = PAD_ID, fill: bytes = b"Z") -> bytes:
    """A stored member's local header, padded with an extra field (``pad_id``) so that its
    bytes start at ``entry.data``."""
    big = entry.size >= ZIP64_LIMIT
    extra = _extra64(entry.size, entry.size) if big else b""
    pad = entry.data - entry.header - LOCAL.size - len(entry.name) - len(extra)
    extra += struct.pack("<HH", pad_id, pad - 4) + fill * (pad - 4)
    size32 = MASK32 if big else entry.size
    version = 45 if big else 20
    fields = (0x04034B50, version, entry.flags, 0, 0, DOS_DATE, entry.crc, size32, size32)
    return LOCAL.pack(*fields, len(entry.name), len(extra)) + entry.name + extra


def central_directory(entries: list[Entry], start: int) -> bytes:
    """The central directory and end records, zip64 where sizes or counts need it."""
    out = bytearray()
    for e in entries:
        big_size, big_offset = e.size >= ZIP64_LIMIT, e.header >= ZIP64_LIMIT
        extra = _extra64(
            *([e.size, e.size] if big_size else []), *([e.header] if big_offset else [])
        )
        size32 = MASK32 if big_size else e.size
        version = 45 if extra else 20
        out += CENTRAL.pack(
            0x02014B50, version, version, e.flags, 0, 0, DOS_DATE, e.crc, size32, size32,
            len(e.name), len(extra), 0, 0, 0, 0, MASK32 if big_offset else e.header,
        )  # fmt: skip
        out += e.name + extra
    size, count = len(out), len(entries)
    big = count >= MASK16 or size >= ZIP64_LIMIT or start >= ZIP64_LIMIT
    if big:
        end64 = start + size
        out += END64.pack(0x06064B50, END64.size - 12, 45, 45, 0, 0, count, count, size, start)
        out += LOCATOR64.pack(0x07064B50, 0, end64, 1)
    count16 = MASK16 if big else count
    out += END.pack(
        0x06054B50, 0, 0, count16, count16, MASK32 if big else size, MASK32 if big else start, 0
    )
    return bytes(out)


def write(path: Path, pickle: bytes, storages: list[tuple[LazyTensor, str]], reader, progress):
    """Write a torch.save archive: ``pickle`` as data.pkl, then each storage tensor as
    ``data/<i>``, its bytes placed by ``reader`` (a :class:`rawio.SpanReader`);
    ``progress(bytes done)`` after each."""
    small = {
        ".format_version": b"1",
        ".storage_alignment": str(ALIGNMENT).encode(),
        "byteorder": b"little",
    }
    tail = {"version": b"3\n", ".data/serialization_id": f"{random.getrandbits(128):040d}".encode()}
    names = ["data.pkl", *small, *(f"data/{i}" for i in range(len(storages))), *tail]
    contents = [pickle, *small.values(), *storages, *tail.values()]
    sizes = [len(c) if isinstance(c, bytes) else c[0].nbytes for c in contents]
    entries, end = _layout([f"archive/{n}" for n in names], sizes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    done = 0
    try:
        preallocate(fd, end)  # the central directory after it is small
        with Placer(reader, fd) as placer:
            for entry, content in zip(entries, contents, strict=True):
                placer.put(entry.header, local_header(entry))  # its CRC comes after the data
                if isinstance(content, bytes):
                    entry.crc = zlib.crc32(content)
                    placer.put(entry.data, content)
                else:
                    lazy, name = content
                    entry.crc = placer.tensor(entry.data, lazy, name=name, crc=True)
                    done += lazy.nbytes
                    if progress:
                        progress(done)
                placer.put(entry.header, local_header(entry))
            placer.put(end, central_directory(entries, end))
    finally:
        os.close(fd)


def lazy_tensor(
    path: str, heads: mmap.mmap, record: Record | None, ref: Any, mapping: Any
) -> tuple[LazyTensor, tuple]:
    """A tensor reference as a lazy tensor, checked against its storage record: a span
    when its bytes are contiguous.  (Called once per tensor: kept lean.)"""
    if record is None:
        raise FormatError(path, f"storage {ref.storage.key!r} has no data record")
    if not record.stored:
        raise torchpickle.NotPlain("compressed storage record")
    itemsize = (dtypes.DTYPES.get(ref.dtype) or dtypes.get(ref.dtype, subject=path)).itemsize
    size = ref.storage.numel * (itemsize if ref.storage.dtype else 1)
    if size != record.size:
        raise FormatError(
            path,
            f"storage {ref.storage.key!r} declares {size} bytes, its record holds {record.size}",
        )
    shape, stride = ref.shape, ref.stride
    numel, last, step, contiguous = 1, ref.offset, 1, True
    for n, s in zip(reversed(shape), reversed(stride), strict=True):
        if type(n) is not int or type(s) is not int or not 0 <= n <= INT64_MAX >= s >= 0:
            raise FormatError(path, f"tensor size {shape} or stride {stride} is not valid")
        numel *= n
        last += (n - 1) * s
        contiguous = contiguous and (n == 1 or s == step)
        step *= n
    nbytes = numel * itemsize
    if numel and (last + 1) * itemsize > size:
        raise FormatError(path, f"a tensor of shape {list(shape)} reaches past its storage")
    if not numel and dtypes.numel(tuple(n or 1 for n in shape)) * itemsize > INT64_MAX:
        raise FormatError(path, f"tensor size {shape} overflows 64-bit byte sizes")
    if not contiguous and nbytes > VIEW_SLACK:  # stride-0 (expand) or overlapping views
        what = f"a tensor of shape {list(shape)} on storage {ref.storage.key!r}"
        check_expansion(path, what, nbytes, size)
    start = data_offset(path, heads, record)
    if contiguous:
        begin = start + ref.offset * itemsize
        load = partial(mapping.tensor, ref.dtype, shape, begin, nbytes)
        lazy = LazyTensor(ref.dtype, shape, load, span=Span(path, begin, nbytes))
    else:
        load = partial(mapping.tensor, ref.dtype, shape, start, size, view=(stride, ref.offset))
        lazy = LazyTensor(ref.dtype, shape, load)
    if 1 in shape:  # strides of size-1 dimensions do not matter (view() resets them)
        stride = tuple(0 if n == 1 else s for n, s in zip(shape, stride, strict=True))
    return lazy, (ref.storage.key, size, ref.offset, shape, stride, ref.dtype)
