"""Writing ``.npz`` files: stored members, each ``.npy`` header padded as numpy pads it,
the array's values at a 64-byte boundary of the file (a padding extra field in the local
header), each member's CRC-32 combined from its header's and its values' (:func:`crc32_combine`),
so that a tensor's bytes are read once and placed with :mod:`rawio`'s kernel copies."""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import dtypes, rawio
from ..checkpoint import LazyTensor
from .npzio import ALIGNMENT, MAGIC
from .npzzip import CENTRAL, END, END64, LOCAL, LOCATOR64, MASK16, MASK32, UTF8_FLAG, ZIP64_LIMIT

DOS_DATE, PAD_ID = 0x21, 0x4E4E  # PAD_ID: "NN", nnconv's padding extra field


def descr(spec: dtypes.DType) -> str:
    """numpy's descr for the array type a dtype is stored as ('<f4', '|u1', '|b1')."""
    code = "b1" if spec.numpy == "?" else spec.numpy
    return code if code[0] in "<>" else "|" + code


def npy_header(code: str, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header as numpy writes it, padded to a multiple of 64 bytes."""
    shown = repr(tuple(int(n) for n in shape))
    text = f"{{'descr': {code!r}, 'fortran_order': False, 'shape': {shown}, }}"
    pad = -(10 + len(text) + 1) % ALIGNMENT
    return (
        MAGIC + struct.pack("<BBH", 1, 0, len(text) + pad + 1) + text.encode() + b" " * pad + b"\n"
    )


_SHIFTS: list[list[int]] = []  # [k]: the GF(2) operator that appends 2**k zero bytes to a CRC


def _times(matrix: list[int], vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (zlib's
    ``crc32_combine``, which Python's zlib lacks): ~100 µs, its operators built once."""
    if not _SHIFTS:
        op = [0xEDB88320] + [1 << n for n in range(31)]  # appends one zero bit
        for step in range(3 + 64):  # squared: 2, 4, 8 bits (a byte), then 2, 4... bytes
            op = [_times(op, row) for row in op]
            if step >= 2:
                _SHIFTS.append(op)
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _times(_SHIFTS[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


@dataclass
class _Entry:
    name: bytes
    flags: int
    header: int  # offset of the local header
    data: int  # offset of the member's bytes (its .npy header)
    size: int
    crc: int = 0


def _encode(name: str) -> tuple[bytes, int]:
    """A member name's bytes and flags, as zipfile writes them (UTF-8 flagged when not ASCII)."""
    return (name.encode(), 0) if name.isascii() else (name.encode(), UTF8_FLAG)


def _local(e: _Entry) -> bytes:
    big = e.size >= ZIP64_LIMIT
    extra = struct.pack("<HHQQ", 1, 16, e.size, e.size) if big else b""
    pad = e.data - e.header - LOCAL.size - len(e.name) - len(extra)
    extra += struct.pack("<HH", PAD_ID, pad - 4) + b"\0" * (pad - 4)
    size32 = MASK32 if big else e.size
    fields = (0x04034B50, 45 if big else 20, e.flags, 0, 0, DOS_DATE, e.crc, size32, size32)
    return LOCAL.pack(*fields, len(e.name), len(extra)) + e.name + extra


def _central(entries: list[_Entry], start: int) -> bytes:
    """The central directory and end records, zip64 where sizes, offsets or counts need it."""
    out = bytearray()
    for e in entries:
        big_size, big_offset = e.size >= ZIP64_LIMIT, e.header >= ZIP64_LIMIT
        values = ([e.size, e.size] if big_size else []) + ([e.header] if big_offset else [])
        extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
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


def write_zip(
    path: Path,
    items: list[tuple[str, bytes, LazyTensor | bytes, str]],
    reader: rawio.SpanReader,
    progress: Any,
) -> None:
    """An uncompressed zip of ``(member name, .npy header, values, tensor name)`` items:
    values are a tensor (its bytes placed by ``reader``) or bytes; ``progress(bytes done)``
    after each tensor."""
    entries, pos = [], 0
    for name, head, body, _ in items:
        raw, flags = _encode(name)
        size = len(head) + (len(body) if isinstance(body, bytes) else body.nbytes)
        fixed = LOCAL.size + len(raw) + (20 if size >= ZIP64_LIMIT else 0)
        pad = -(pos + fixed + 4 + len(head)) % ALIGNMENT + 4  # values 64-byte aligned
        entries.append(_Entry(raw, flags, pos, pos + fixed + pad, size))
        pos += fixed + pad + size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    done = 0
    try:
        rawio.preallocate(fd, pos)  # the central directory after it is small
        with rawio.Placer(reader, fd) as placer:
            for entry, (_, head, body, name) in zip(entries, items, strict=True):
                placer.put(entry.header, _local(entry))  # again once the CRC is known
                placer.put(entry.data, head)
                at, entry.crc = entry.data + len(head), zlib.crc32(head)
                if isinstance(body, bytes):
                    placer.put(at, body)
                    entry.crc = zlib.crc32(body, entry.crc)
                elif body.nbytes >= rawio.SMALL:  # copied on its own, CRC'd from zero
                    crc = placer.tensor(at, body, name=name, crc=True)
                    entry.crc = crc32_combine(entry.crc, crc, body.nbytes)
                else:  # gathered into a batched write, CRC'd from the header's
                    pieces = reader.chunks(body, name=name)
                    with contextlib.closing(pieces):  # type: ignore[type-var]
                        for piece in pieces:
                            entry.crc = zlib.crc32(piece, entry.crc)
                            placer.put(at, piece)
                            at += len(piece)
                if not isinstance(body, bytes):
                    done += body.nbytes
                    if progress:
                        progress(done)
                placer.put(entry.header, _local(entry))
            placer.put(pos, _central(entries, pos))
    finally:
        os.close(fd)
