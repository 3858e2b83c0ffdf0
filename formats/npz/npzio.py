"""Reading the ``.npy`` members of ``.npz`` files (the zip layer: :mod:`.npzzip`).

A ``.npy`` header is at most :data:`MAX_NPY_HEADER` bytes of a Python dict
literal: numpy's own spelling is matched by a regular expression, anything else
goes to ``ast.literal_eval`` (literals only: nothing runs).  A deflated member is
inflated in pieces, its output capped at the size its zip entry declares, which
may not exceed :data:`DEFLATE_MAX_RATIO` times its compressed bytes: a zip bomb
stops there.

Writing is :mod:`.npzwrite`.
"""

from __future__ import annotations

import ast
import re
import struct
import zlib
from typing import Any, NamedTuple

from .. import dtypes
from ..checkpoint import INT64_MAX
from ..errors import FormatError, NnconvError, UnsupportedError
from .npzzip import CRAFTED, Member, data_offset

MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 10_000  # numpy's own limit on a header (np.load's max_header_size)
HEADER_PREFIX = 12 + MAX_NPY_HEADER  # magic, version, length field and the header text
MAX_DIMS = 64  # numpy's NPY_MAXDIMS
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this
ALIGNMENT = 64
CHUNK_IN, CHUNK_OUT = 1 << 20, 16 << 20  # compressed bytes fed, inflated bytes taken per step
# numpy's spelling of a header (np.save), values captured; anything else: ast.literal_eval.
_NUMPY_HEADER = re.compile(
    r"\{'descr': '([<>|=]?[a-zA-Z?]\d{0,2})', 'fortran_order': (True|False), "
    r"'shape': \(((?:\d{1,19}, ?)*\d{0,19})\), \}\s*"
)
_DESCR = re.compile(r"([<>|=]?)([a-zA-Z])(\d{1,2})")
# (kind, itemsize) -> the dtype numpy stores that way natively.
KINDS: dict[tuple[str, int], dtypes.DType] = {
    ("b" if s.numpy == "?" else s.numpy.lstrip("<>")[0], s.itemsize): s
    for s in dtypes.BY_NUMPY.values()
}


class Array(NamedTuple):
    """A ``.npy`` member's header: the dtype numpy stores, byte order, layout, shape, and
    where the values start (``skip`` bytes into the member, whose data is at ``start``)."""

    spec: dtypes.DType
    big: bool
    fortran: bool
    shape: tuple[int, ...]
    nbytes: int
    skip: int
    start: int
    member: Member


# --- .npy headers --------------------------------------------------------------------


def _fields(text: str, bad: Any) -> tuple[Any, Any, Any]:
    """(descr, fortran_order, shape) of a header's text."""
    match = _NUMPY_HEADER.fullmatch(text)
    if match and ("," in match[3] or not match[3]):
        shape = tuple(int(n) for n in match[3].replace(" ", "").split(",") if n)
        return match[1], match[2] == "True", shape
    try:
        found = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise bad("its .npy header is not a Python dict literal", remedy=CRAFTED) from None
    if not isinstance(found, dict) or set(found) != {"descr", "fortran_order", "shape"}:
        raise bad("its .npy header does not hold exactly descr, fortran_order and shape")
    return found["descr"], found["fortran_order"], found["shape"]


def parse_header(subject: str, member: Member, head: bytes | bytearray, start: int) -> Array:
    """A member's ``.npy`` header from its first bytes (``head``), checked: the member's
    declared size must be the header plus exactly the values its shape needs."""
    name, size = member.name, member.size

    def bad(problem: str, error: type[NnconvError] = FormatError, **kw: Any) -> NnconvError:
        return error(subject, f"member {name!r}: {problem}", **kw)

    if head[:6] != MAGIC or len(head) < 10:
        raise bad("not a .npy array (no \\x93NUMPY magic)", remedy=CRAFTED)
    major = head[6]
    if major not in (1, 2, 3) or (major > 1 and len(head) < 12):
        raise bad(f".npy format version {major}.{head[7]} is not one numpy writes")
    at = 10 if major == 1 else 12
    (length,) = struct.unpack_from("<H" if major == 1 else "<I", head, 8)
    if length > MAX_NPY_HEADER:
        raise bad(f".npy header of {length:,} bytes", value=length, limit=MAX_NPY_HEADER,
                  remedy="numpy refuses headers over 10,000 bytes too; " + CRAFTED)  # fmt: skip
    if at + length > len(head):
        raise bad("truncated inside its .npy header", remedy=CRAFTED)
    try:
        text = bytes(head[at : at + length]).decode("latin1" if major < 3 else "utf-8")
    except UnicodeDecodeError:
        raise bad("its .npy header is not UTF-8") from None
    descr, fortran, shape = _fields(text, bad)
    if type(fortran) is not bool:
        raise bad(f"fortran_order {fortran!r} is not True or False")
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise bad(f"shape {shape!r} is not a tuple of sizes")
    if len(shape) > MAX_DIMS or any(n > INT64_MAX for n in shape):
        raise bad(f"shape of {len(shape)} dimensions or sizes past 2**63", remedy=CRAFTED)
    if isinstance(descr, str) and descr.lstrip("<>|=") == "O":
        raise bad(
            "an object array: its values are a pickle",
            remedy="nnconv never unpickles, as np.load(allow_pickle=False); store numbers",
        )
    match = _DESCR.fullmatch(descr.replace("?", "b1")) if isinstance(descr, str) else None
    spec = KINDS.get((match[2], int(match[3]))) if match else None
    if spec is None:
        shown = f"numpy dtype {descr!r}" if isinstance(descr, str) else "a structured dtype"
        raise bad(f"{shown} has no torch dtype", UnsupportedError,
                  remedy="store it as a numeric, complex or bool array")  # fmt: skip
    nbytes = dtypes.numel(shape) * spec.itemsize
    if not nbytes and dtypes.numel(tuple(n or 1 for n in shape)) * spec.itemsize > INT64_MAX:
        raise bad(f"shape {list(shape)} overflows 64-bit sizes", remedy=CRAFTED)
    skip = at + length
    if skip + nbytes != size:
        raise bad(
            f"shape {list(shape)} {descr} needs {nbytes:,} bytes after its header, the member "
            f"holds {max(0, size - skip):,}",
            value=nbytes, limit=max(0, size - skip), remedy="the file is truncated or corrupt",
        )  # fmt: skip
    big = bool(match and match[1] == ">" and spec.itemsize > 1)
    return Array(spec, big, fortran, shape, nbytes, skip, start, member)


def read_array(subject: str, heads: Any, member: Member) -> Array:
    """A member's header, read from the mapped archive ``heads`` (deflated: inflated only as
    far as the header goes) and checked against the member's declared size."""
    start = data_offset(subject, heads, member)
    want = min(member.size, HEADER_PREFIX)
    if member.stored:
        head = heads[start : start + want]
    else:
        head = inflate(subject, member.name, heads, start, member.csize, want)
    return parse_header(subject, member, head, start)


def inflate(
    subject: str, name: str, source: Any, start: int, csize: int, want: int,
    *, skip: int = 0, crc: int | None = None,
) -> bytearray:  # fmt: skip
    """The first ``want`` bytes the deflated ``source[start : start + csize]`` inflates to,
    less the first ``skip``: never more is produced.  With ``crc``, those must be the whole
    member and match its CRC-32."""
    out = bytearray(want - skip)
    inflater = zlib.decompressobj(-15)
    done, pos, end, pending, check = 0, start, start + csize, b"", 0
    step = min(CHUNK_IN, 4096 + want)  # a header needs little input: copy little
    try:
        while done < want:
            if not pending:
                if pos >= end or inflater.eof:
                    break
                pending = source[pos : min(end, pos + step)]
                pos += len(pending)
            piece = inflater.decompress(pending, min(CHUNK_OUT, want - done))
            pending = inflater.unconsumed_tail
            if crc is not None:
                check = zlib.crc32(piece, check)
            cut = max(0, skip - done)
            if cut < len(piece):
                out[done + cut - skip : done + len(piece) - skip] = memoryview(piece)[cut:]
            done += len(piece)
    except zlib.error as exc:
        raise FormatError(subject, f"member {name!r} is corrupt: {exc}", remedy=CRAFTED) from None
    if done < want:
        raise FormatError(
            subject, f"member {name!r} inflates to fewer bytes than the {want:,} it declares",
            value=done, remedy="the file is truncated or corrupt",
        )  # fmt: skip
    if crc is not None and check != crc:
        raise FormatError(subject, f"member {name!r}: CRC-32 mismatch", remedy=CRAFTED)
    return out
