"""Writing ``.npz`` files: stored members, each ``.npy`` header padded as numpy pads it,
the array's values at a 64-byte boundary of the file (a padding extra field in the local
header), each member's CRC-32 combined from its header's and its values' (:func:`crc32_combine`),
so that a tensor's bytes are read once and placed with :mod:`rawio`'s kernel copies."""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from .. import dtypes, rawio
from ..checkpoint import LazyTensor
from ..torchzip import LOCAL, ZIP64_LIMIT, Entry, central_directory, local_header
from .npzio import ALIGNMENT, MAGIC
from .npzzip import UTF8_FLAG

PAD_ID = 0x4E4E  # "NN": nnconv's padding extra field


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


def _encode(name: str) -> tuple[bytes, int]:
    """A member name's bytes and flags, as zipfile writes them (UTF-8 flagged when not ASCII)."""
    return (name.encode(), 0) if name.isascii() else (name.encode(), UTF8_FLAG)


def _local(e: Entry) -> bytes:
    return local_header(e, pad_id=PAD_ID, fill=b"\0")


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
        entries.append(Entry(raw, pos, pos + fixed + pad, size, flags=flags))
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
            placer.put(pos, central_directory(entries, pos))
    finally:
        os.close(fd)
