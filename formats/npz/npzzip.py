"""The zip container of ``.npz`` files: its directory read with every field bounded.

The central directory is parsed from the end of the file (zip64 included), with
every size and offset checked against the file, member names decoded as
``zipfile`` decodes them (UTF-8 when flagged, else cp437), exact duplicates
refused (names differing only in case are distinct, as they are to numpy), and
each member's local header checked against its directory entry before its bytes
are used (:func:`data_offset`).  Parsed once per file state (detection and
reading share it), without building a ``zipfile.ZipInfo`` per member.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import Any, NamedTuple

from .. import paths, torchzip
from ..errors import FormatError
from ..torchzip import (  # the zip records' layouts: one definition
    CENTRAL,
    END,
    END64,
    LOCAL,
    LOCATOR64,
    MASK16,
    MASK32,
)

STORED, DEFLATED = 0, 8
UTF8_FLAG = 0x800  # the member name is UTF-8 (else cp437)
CRAFTED = "the file is corrupt or crafted"
# The central directory fields read: signature, flags, method, CRC, sizes, name/extra/
# comment lengths, local header offset.
CENTRAL_FIELDS = struct.Struct("<4s4xHH4xIIIHHH8xI")


class Member(NamedTuple):
    """One zip entry as its central directory describes it."""

    name: str
    header: int  # offset of its local header
    size: int  # uncompressed
    csize: int  # as stored
    method: int
    flags: int
    crc: int
    nlen: int  # length of the encoded name, which the local header repeats

    @property
    def stored(self) -> bool:
        return self.method == STORED and not self.flags & 1 and self.size == self.csize


def members(path: str | os.PathLike[str]) -> dict[str, Member]:
    """The archive's entries by name, in directory order (cached per file state)."""
    st = os.stat(path)
    return _members(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=4)
def _members(path: str, size: int, _mtime: int, _inode: int) -> dict[str, Member]:
    def bad(problem: str) -> FormatError:
        return FormatError(path, f"corrupt or truncated zip archive: {problem}", remedy=CRAFTED)

    with os.fdopen(paths.open_regular(path), "rb") as fh:
        fh.seek(max(0, size - END.size - MASK16))
        tail = fh.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < END.size:
            raise bad("no end of central directory")
        count, cd_size, cd_start = END.unpack_from(tail, at)[4:7]
        if count == MASK16 or MASK32 in (cd_size, cd_start):
            if at < LOCATOR64.size or tail[at - LOCATOR64.size : at - 16] != b"PK\x06\x07":
                raise bad("zip64 fields without a zip64 locator")
            (end64,) = struct.unpack_from("<Q", tail, at - LOCATOR64.size + 8)
            fh.seek(min(end64, size))
            raw = fh.read(END64.size)
            if len(raw) < END64.size or raw[:4] != b"PK\x06\x06":
                raise bad("bad zip64 end record")
            count, cd_size, cd_start = END64.unpack(raw)[7:]
        if cd_start + cd_size > size or count * CENTRAL.size > cd_size:
            raise bad(f"central directory of {count} entries does not fit the file")
        fh.seek(cd_start)
        cd = fh.read(cd_size)
    out: dict[str, Member] = {}
    pos = 0
    for _ in range(count):
        if pos > len(cd) - CENTRAL.size:
            raise bad("central directory ends early")
        sig, flags, method, crc, csize, usize, nlen, elen, clen, header = (
            CENTRAL_FIELDS.unpack_from(cd, pos)
        )
        if sig != b"PK\x01\x02":
            raise bad("bad central directory entry")
        name_at = pos + CENTRAL.size
        pos = name_at + nlen + elen + clen
        if pos > len(cd):
            raise bad("central directory entry runs past its end")
        if MASK32 in (csize, usize, header):
            extra = cd[name_at + nlen : name_at + nlen + elen]
            usize, csize, header = _zip64(extra, (usize, csize, header), bad)
        try:
            name = cd[name_at : name_at + nlen].decode("utf-8" if flags & UTF8_FLAG else "cp437")
        except UnicodeDecodeError:
            raise bad("a member name is not valid UTF-8") from None
        if header + LOCAL.size + csize > size:
            raise bad(f"member {name!r} claims {csize} bytes at offset {header}")
        if name in out:
            raise FormatError(path, f"zip archive names member {name!r} twice", remedy=CRAFTED)
        out[name] = Member(name, header, usize, csize, method, flags, crc, nlen)
    return out


def _zip64(extra: bytes, values: tuple[int, int, int], bad: Any) -> tuple[int, int, int]:
    """(uncompressed size, compressed size, offset), the masked ones from the zip64 field."""
    pos = 0
    while pos + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, pos)
        if kind == 1:
            body = extra[pos + 4 : pos + 4 + length]
            found = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if sum(v == MASK32 for v in values) > len(found):
                raise bad("zip64 extra field is too short")
            usize, csize, header = (found.pop(0) if v == MASK32 else v for v in values)
            return usize, csize, header
        pos += 4 + length
    raise bad("32-bit size or offset masked but no zip64 extra field")


def data_offset(path: str, heads: Any, member: Member) -> int:
    """Where a member's bytes start in the mapped archive ``heads``: the checks of torch's
    zips (the local header repeats its directory entry, the bytes lie inside the file),
    plus the name itself, which an npz's keys are."""
    start = torchzip.data_offset(path, heads, member)  # type: ignore[arg-type]
    at = member.header + LOCAL.size
    encoded = member.name.encode("utf-8" if member.flags & UTF8_FLAG else "cp437")
    if heads[at : at + member.nlen] != encoded:
        raise FormatError(
            path,
            f"member {member.name!r}: its local header disagrees with the central directory "
            "(name, method or sizes)",
            remedy=CRAFTED,
        )
    return start
