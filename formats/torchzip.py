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

import os
import random
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError
from .rawio import write_all

ALIGNMENT = 64  # torch's record alignment (so that records can be memory-mapped)
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets at or above this need zip64 fields
MASK32, MASK16 = 0xFFFFFFFF, 0xFFFF  # what a 32/16-bit field holds when zip64 has the value
LOCAL = struct.Struct("<IHHHHHIIIHH")
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
END = struct.Struct("<IHHHHIIH")
END64 = struct.Struct("<IQHHIIQQQQ")
LOCATOR64 = struct.Struct("<IIQI")
PAD_ID = 0x4246  # "FB": the padding extra field torch uses to align records
DOS_DATE = 0x21  # 1980-01-01, the zip epoch: files come out the same for the same input


@dataclass(frozen=True)
class Record:
    """One zip member: where its bytes start in the file, how many, and whether stored."""

    name: str
    offset: int
    size: int
    stored: bool


def index(path: Path, infos: list[zipfile.ZipInfo]) -> dict[str, Record]:
    """Each record's data offset, read from its local header (zipfile gives only the
    header's offset; the data starts after the local name and extra field)."""
    records = {}
    with open(path, "rb") as fh:
        for info in infos:
            fh.seek(info.header_offset)
            head = fh.read(LOCAL.size)
            if len(head) < LOCAL.size or head[:4] != b"PK\x03\x04":
                raise FormatError(path, f"record {info.filename!r}: bad local header")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            offset = info.header_offset + LOCAL.size + name_len + extra_len
            stored = info.compress_type == zipfile.ZIP_STORED
            records[info.filename] = Record(info.filename, offset, info.file_size, stored)
    return records


@dataclass
class _Entry:
    name: bytes
    header: int  # offset of the local header
    data: int  # offset of the data
    size: int
    crc: int = 0


def _extra64(*values: int) -> bytes:
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""


def _layout(names: list[str], sizes: list[int]) -> tuple[list[_Entry], int]:
    """Place every record: local header, zip64 sizes where needed, padding to 64 bytes."""
    entries, pos = [], 0
    for name, size in zip(names, sizes, strict=True):
        raw = name.encode()
        fixed = LOCAL.size + len(raw) + (20 if size >= ZIP64_LIMIT else 0)
        pad = -(pos + fixed + 4) % ALIGNMENT + 4  # a padding field is at least its 4-byte head
        entries.append(_Entry(raw, pos, pos + fixed + pad, size))
        pos = pos + fixed + pad + size
    return entries, pos


def _local_header(entry: _Entry) -> bytes:
    big = entry.size >= ZIP64_LIMIT
    extra = _extra64(entry.size, entry.size) if big else b""
    pad = entry.data - entry.header - LOCAL.size - len(entry.name) - len(extra)
    extra += struct.pack("<HH", PAD_ID, pad - 4) + b"Z" * (pad - 4)
    size32 = MASK32 if big else entry.size
    version = 45 if big else 20
    fields = (0x04034B50, version, 0, 0, 0, DOS_DATE, entry.crc, size32, size32)
    return LOCAL.pack(*fields, len(entry.name), len(extra)) + entry.name + extra


def _central(entries: list[_Entry], start: int) -> bytes:
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
            0x02014B50, version, version, 0, 0, 0, DOS_DATE, e.crc, size32, size32,
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


def write(
    path: Path,
    pickle: bytes,
    storages: list[tuple[int, Callable[[int, int], int]]],
) -> None:
    """Write a torch.save archive: ``pickle`` as data.pkl, then storage ``i`` (of
    ``size`` bytes) as ``data/i``, whose bytes ``fill(fd, offset)`` writes, returning
    their CRC-32."""
    small = {
        ".format_version": b"1",
        ".storage_alignment": str(ALIGNMENT).encode(),
        "byteorder": b"little",
    }
    tail = {"version": b"3\n", ".data/serialization_id": f"{random.getrandbits(128):040d}".encode()}
    names = ["data.pkl", *small, *(f"data/{i}" for i in range(len(storages))), *tail]
    sizes = [len(pickle), *map(len, small.values()), *(s for s, _ in storages)]
    sizes += map(len, tail.values())
    entries, end = _layout([f"archive/{n}" for n in names], sizes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        contents = [pickle, *small.values(), *([None] * len(storages)), *tail.values()]
        for i, (entry, data) in enumerate(zip(entries, contents, strict=True)):
            if data is None:
                entry.crc = storages[i - 1 - len(small)][1](fd, entry.data)
            else:
                entry.crc = zlib.crc32(data)
                write_all(fd, data, entry.data)
            write_all(fd, _local_header(entry), entry.header)
        write_all(fd, _central(entries, end), end)
    finally:
        os.close(fd)
