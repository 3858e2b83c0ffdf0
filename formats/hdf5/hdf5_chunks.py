"""What nnconv does itself instead of letting libhdf5 do it: following links, and
decoding chunked data.

Links.  libhdf5 follows soft and external links wherever a path names them, and an
external link opens another file (a FIFO there blocks, a secret file is read).  So
nnconv never hands libhdf5 a path: :func:`lookup` walks one segment at a time, checks
each link's type first, opens only hard links (one segment, nothing to follow),
resolves soft links itself, at most :data:`MAX_SOFT_LINKS` of them, and refuses
external and user-defined links before anything is opened.  The HDF5 worker also
unregisters libhdf5's external link class (:func:`forbid_external_links`).

Chunks.  libhdf5's deflate filter grows its output until the stream ends, whatever
the chunk's size: two stacked deflate filters make a 16 KB file inflate to gigabytes.
So chunked data is read raw (``read_direct_chunk``) and decoded here, each stage's
output bounded by the chunk's own size (``zlib``'s ``max_length``, a fixed LZF output
buffer): deflate or LZF, shuffle and fletcher32, each at most once
(:func:`pipeline_problem`); any other filter is refused before a value is read.
Every chunk must decode to exactly its nominal size.  Imports neither torch nor
nnconv (the HDF5 worker imports it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import stat
import zlib

DEFLATE, SHUFFLE, FLETCHER32, LZF = 1, 2, 3, 32000
NAMES = {DEFLATE: "deflate", SHUFFLE: "shuffle", FLETCHER32: "fletcher32", LZF: "lzf"}
OTHERS = {4: "szip", 5: "nbit", 6: "scaleoffset", 307: "bzip2", 32001: "blosc", 32004: "lz4"}
COMPRESSORS = (DEFLATE, LZF)
MAX_SOFT_LINKS = 16  # libhdf5's own default (H5L_NUM_LINKS)
H5L_TYPE_EXTERNAL = 64
CRAFTED = "the file is corrupt or crafted"
OUTSIDE = "nnconv reads nothing outside the file"


class Refused(Exception):
    """A link, filter or chunk nnconv will not follow or decode: (kind, problem, details)."""

    def __init__(self, problem: str, *, kind: str = "FormatError", **details) -> None:
        super().__init__(problem)
        self.kind, self.problem = kind, problem
        self.value, self.limit = details.get("value"), details.get("limit")
        self.remedy = details.get("remedy", CRAFTED)


# --- files and links --------------------------------------------------------------------


def regular_file(path) -> os.stat_result:
    """``path``'s stat when it is a regular file; a FIFO, device or socket is refused
    without being opened (opening a FIFO blocks until a writer comes)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Refused("not a regular file", remedy="HDF5 files are read by seeking")
    return st


def same_file(fid, st: os.stat_result) -> None:
    """The file libhdf5 opened is the regular file ``st`` described (not swapped since)."""
    try:
        handle = fid.get_vfd_handle()
    except Exception:  # another driver: no descriptor to check
        return
    now = os.fstat(handle)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        raise Refused("changed while nnconv opened it", remedy="retry when nothing writes it")


def forbid_external_links() -> bool:
    """Unregister libhdf5's external link class in this process (the HDF5 worker), so
    libhdf5 itself cannot follow one; True when done."""
    try:
        with open("/proc/self/maps") as fh:
            libs = {ln.split()[-1] for ln in fh if re.search(r"/libhdf5(_serial)?[-.][^/]*$", ln)}
        for lib in sorted(libs):
            if ctypes.CDLL(lib).H5Lunregister(ctypes.c_int(H5L_TYPE_EXTERNAL)) >= 0:
                return True
    except (OSError, AttributeError, IndexError):
        pass
    return False


def lookup(h5py, root, start, path: str):
    """The object at ``path`` (from ``start``, or ``root`` when absolute), or None when a
    name is absent or a soft link dangles.  Only hard links are opened; soft links are
    resolved here; external and user-defined links are refused unopened."""
    node = root if path.startswith("/") else start
    parts = [p for p in reversed(path.split("/")) if p and p != "."]
    hops = 0
    while parts:
        part = parts.pop()
        if not isinstance(node, h5py.h5g.GroupID):
            raise Refused(f"cannot open {path!r}: {part!r} would be inside a dataset")
        name = part.encode("utf-8", "surrogateescape")
        if not node.links.exists(name):
            return None
        kind = node.links.get_info(name).type
        if kind == h5py.h5l.TYPE_HARD:
            node = h5py.h5o.open(node, name)
        elif kind == h5py.h5l.TYPE_SOFT:
            hops += 1
            if hops > MAX_SOFT_LINKS:
                problem = f"{path!r}: more than {MAX_SOFT_LINKS} soft links to follow"
                raise Refused(problem, value=hops, limit=MAX_SOFT_LINKS)
            target = node.links.get_val(name).decode("utf-8", "surrogateescape")
            parts += [p for p in reversed(target.split("/")) if p and p != "."]
            node = root if target.startswith("/") else node
        elif kind == H5L_TYPE_EXTERNAL:
            raise Refused(f"{path!r} goes through an external link ({part!r})", remedy=OUTSIDE)
        else:
            raise Refused(f"{path!r} goes through a user-defined link ({part!r}, type {kind})")
    return node


# --- filter pipelines ------------------------------------------------------------------


def pipeline_problem(codes) -> Refused | None:
    """Why nnconv will not decode a pipeline of these filter codes, else None."""
    codes = [int(c) for c in codes]
    for code in codes:
        if code not in NAMES:
            name = OTHERS.get(code, "a filter plugin")
            return Refused(
                f"uses HDF5 filter {code} ({name}); nnconv decodes deflate, lzf, shuffle "
                "and fletcher32",
                kind="UnsupportedError",
                remedy="rewrite it with h5py using compression='gzip' or 'lzf'",
            )
    repeated = sorted({NAMES[c] for c in codes if codes.count(c) > 1})
    if repeated or sum(c in COMPRESSORS for c in codes) > 1:
        what = ", ".join(repeated) or "deflate and lzf"
        return Refused(f"stacks HDF5 filters ({what} more than once in one pipeline)")
    return None


def _inflate(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
        if not d.eof and d.decompress(d.unconsumed_tail, 1):
            raise Refused(f"a deflate chunk inflates past {limit:,} bytes", limit=limit)
    except zlib.error as exc:
        raise Refused(f"a deflate chunk is corrupt: {exc}") from None
    if not d.eof:
        raise Refused("a deflate chunk is truncated")
    return out


_LZF: list = []  # [lzf_decompress or None], found on first use


def _lzf_native():
    if not _LZF:
        fn = None
        try:
            import h5py.h5z

            fn = ctypes.CDLL(h5py.h5z.__file__, use_errno=True).lzf_decompress
            fn.restype = ctypes.c_uint
            fn.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
        except (OSError, AttributeError, ImportError):
            fn = None
        _LZF.append(fn)
    return _LZF[0]


def _unlzf(data: bytes, limit: int) -> bytes:
    fn = _lzf_native()
    if fn is None or len(data) >= 1 << 32 or limit >= 1 << 32:
        return unlzf_python(data, limit)
    out = ctypes.create_string_buffer(max(limit, 1))
    n = fn(data, len(data), out, limit)
    if n == 0 and data:
        if ctypes.get_errno() == 7:  # E2BIG
            raise Refused(f"an lzf chunk decompresses past {limit:,} bytes", limit=limit)
        raise Refused("an lzf chunk is corrupt")
    return out.raw[:n]


def unlzf_python(data: bytes, limit: int) -> bytes:
    """LZF decompression (liblzf's format) that never writes past ``limit`` bytes."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        ctrl = data[i]
        i += 1
        if ctrl < 32:  # a literal run of ctrl + 1 bytes
            run = ctrl + 1
            if i + run > n:
                raise Refused("an lzf chunk is corrupt")
            if len(out) + run > limit:
                raise Refused(f"an lzf chunk decompresses past {limit:,} bytes", limit=limit)
            out += data[i : i + run]
            i += run
            continue
        length = ctrl >> 5
        if length == 7:
            if i >= n:
                raise Refused("an lzf chunk is corrupt")
            length += data[i]
            i += 1
        if i >= n:
            raise Refused("an lzf chunk is corrupt")
        dist = ((ctrl & 0x1F) << 8) + data[i] + 1
        i += 1
        length += 2
        if dist > len(out):
            raise Refused("an lzf chunk is corrupt")
        if len(out) + length > limit:
            raise Refused(f"an lzf chunk decompresses past {limit:,} bytes", limit=limit)
        piece = out[len(out) - dist :]
        out += (piece * (length // dist + 1))[:length]
    return bytes(out)


def _unshuffle(data: bytes, size: int) -> bytes:
    import numpy as np

    count = len(data) // size if size > 1 else 0
    if count <= 1:
        return data
    body = np.frombuffer(data, np.uint8, count * size).reshape(size, count).T
    return body.tobytes() + data[count * size :]


def fletcher32(data: bytes) -> int:
    """libhdf5's H5_checksum_fletcher32 (16-bit big-endian words, folded every 360)."""
    import numpy as np

    words = np.frombuffer(data, ">u2", len(data) // 2).astype(np.int64)
    full = len(words) // 360 * 360
    blocks = [(words[:full].reshape(-1, 360), 360)] if full else []
    if len(words) > full:
        blocks.append((words[full:].reshape(1, -1), len(words) - full))
    s1 = s2 = 0
    for block, tlen in blocks:
        sums = block.sum(axis=1).tolist()
        weighted = (block * np.arange(tlen, 0, -1)).sum(axis=1).tolist()
        for s, t in zip(sums, weighted, strict=True):
            s2 = (s2 + tlen * s1 + t) & 0xFFFFFFFF
            s1 = (s1 + s) & 0xFFFFFFFF
            s1 = (s1 & 0xFFFF) + (s1 >> 16)
            s2 = (s2 & 0xFFFF) + (s2 >> 16)
    if len(data) % 2:
        s1 += data[-1] << 8
        s2 += s1
        s1 = (s1 & 0xFFFF) + (s1 >> 16)
        s2 = (s2 & 0xFFFF) + (s2 >> 16)
    s1 = (s1 & 0xFFFF) + (s1 >> 16)
    s2 = (s2 & 0xFFFF) + (s2 >> 16)
    return (s2 << 16) | s1


def _check_fletcher32(data: bytes) -> bytes:
    if len(data) < 4:
        raise Refused("a fletcher32 chunk is shorter than its checksum")
    body, stored = data[:-4], int.from_bytes(data[-4:], "little")
    value = fletcher32(body)
    swapped = ((value & 0x00FF00FF) << 8) | ((value >> 8) & 0x00FF00FF)  # libhdf5 <= 1.6.2
    if stored not in (value, swapped):
        raise Refused("data error detected by the Fletcher32 checksum")
    return body


def decode(data: bytes, mask: int, filters, nominal: int) -> bytes:
    """One raw chunk through ``filters`` (forward order, as stored) in reverse, skipping
    those ``mask`` marks; each stage bounded, the result exactly ``nominal`` bytes."""
    for i in reversed(range(len(filters))):
        if mask & (1 << i):
            continue
        code, cd = int(filters[i][0]), filters[i][2]
        # What this stage's input was when written: the chunk, plus a checksum when a
        # fletcher32 stage came before it.
        limit = nominal + 4 * sum(int(f[0]) == FLETCHER32 for f in filters[:i])
        if code == DEFLATE:
            data = _inflate(data, limit)
        elif code == LZF:
            data = _unlzf(data, limit)
        elif code == SHUFFLE:
            if not cd or int(cd[0]) < 1:
                raise Refused("a shuffle filter without an element size")
            data = _unshuffle(data, int(cd[0]))
        elif code == FLETCHER32:
            data = _check_fletcher32(data)
        else:  # pipeline_problem refused it before
            raise Refused(f"HDF5 filter {code} is not decoded by nnconv", kind="UnsupportedError")
    if len(data) != nominal:
        problem = f"a chunk decodes to {len(data):,} bytes, not its {nominal:,}"
        raise Refused(problem, value=len(data), limit=nominal)
    return data


# --- chunked datasets ------------------------------------------------------------------


def read_chunked(h5py, dsid, dcpl, file_size: int):
    """A chunked dataset's values as h5py would return them (its numpy dtype), read
    chunk by chunk, each decoded here within its nominal size."""
    import numpy as np

    filters = [dcpl.get_filter(i)[:3] for i in range(dcpl.get_nfilters())]
    problem = pipeline_problem([f[0] for f in filters])
    if problem is not None:
        raise problem
    shape = tuple(dsid.shape)
    chunk = tuple(dcpl.get_chunk())
    tid = dsid.get_type()
    dtype = dsid.dtype
    size = tid.get_size()
    mem = h5py.h5t.py_create(dtype)
    opaque = tid.get_class() == h5py.h5t.OPAQUE and size == dtype.itemsize  # bytes as they are
    convert = not opaque and not tid.equal(mem)
    count = 1
    for c in chunk:
        count *= c
    nominal = count * size
    records = []
    if hasattr(dsid, "chunk_iter"):
        dsid.chunk_iter(records.append)
    else:
        records = [dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())]
    out = np.empty(shape, dtype)
    expected = 1
    for s, c in zip(shape, chunk, strict=True):
        expected *= -(-s // c)
    seen: dict = {}
    for rec in records:
        at = tuple(rec.chunk_offset)
        if len(at) != len(shape) or any(o % c for o, c in zip(at, chunk, strict=True)):
            raise Refused(f"a chunk at {at} is not on the chunk grid {chunk}")
        if any(o >= s for o, s in zip(at, shape, strict=True)):
            continue  # beyond the extent: never part of the values
        if at in seen:
            raise Refused(f"two chunks at {at}")
        seen[at] = rec.size
        start = rec.byte_offset
        if start is None or rec.size > file_size or start > file_size - rec.size:
            end = (start or 0) + rec.size
            raise Refused(f"a chunk's bytes end at {end:,}, past the file's {file_size:,}")
    if len(seen) < expected:  # unwritten chunks read as the fill value
        fill = np.zeros(1, dtype)
        if dcpl.fill_value_defined() != h5py.h5d.FILL_VALUE_UNDEFINED:
            with contextlib.suppress(Exception):  # a fill value h5py cannot show: zeros
                dcpl.get_fill_value(fill)
        out[...] = fill[0]
    for at, stored in seen.items():
        mask, raw = dsid.read_direct_chunk(at)
        if len(raw) != stored:
            raise Refused(f"the chunk at {at} changed size while read")
        data = decode(raw, mask, filters, nominal)
        if convert:
            buf = np.zeros(count * max(size, mem.get_size()), np.uint8)
            buf[:nominal] = np.frombuffer(data, np.uint8)
            h5py.h5t.convert(tid, mem, count, buf)
            values = buf[: count * dtype.itemsize].view(dtype)
        else:
            values = np.frombuffer(data, dtype)
        values = values.reshape(chunk)
        inside = tuple(slice(0, min(c, s - o)) for o, c, s in zip(at, chunk, shape, strict=True))
        where = tuple(slice(o, o + sl.stop) for o, sl in zip(at, inside, strict=True))
        out[where] = values[inside]
    return out


def open_file(h5py, path):
    """(h5py.File, size) of a regular file, checked before and after libhdf5 opens it."""
    st = regular_file(path)
    f = h5py.File(path, "r")
    try:
        same_file(f.id, st)
    except BaseException:
        f.close()
        raise
    return f, st.st_size


def read_values(h5py, fid, hpath: str, shape: tuple, file_size: int):
    """The values of the dataset at ``hpath``, as h5py would return them: chunked data
    decoded here (:func:`read_chunked`); compact and contiguous data (bounded by the
    file, checked before) read by libhdf5; data outside the file refused unread."""
    import numpy as np

    root = h5py.h5g.open(fid, b"/")
    dsid = lookup(h5py, root, root, hpath)
    changed = "the file changed while nnconv read it"
    if not isinstance(dsid, h5py.h5d.DatasetID):
        raise Refused(f"{hpath!r} is not a dataset any more", remedy=changed)
    if tuple(dsid.shape) != tuple(shape):
        problem = f"{hpath!r} has shape {tuple(dsid.shape)}, not {tuple(shape)}"
        raise Refused(problem, remedy=changed)
    dcpl = dsid.get_create_plist()
    if dcpl.get_external_count() or dcpl.get_layout() == h5py.h5d.VIRTUAL:
        raise Refused(f"{hpath!r} keeps its values outside the file", remedy=OUTSIDE)
    if dcpl.get_layout() == h5py.h5d.CHUNKED:
        return read_chunked(h5py, dsid, dcpl, file_size)
    if dcpl.get_nfilters():  # libhdf5 allows filters on chunked data only
        raise Refused(f"{hpath!r} has filters without chunks")
    out = np.empty(tuple(shape), dsid.dtype)
    if out.size:
        dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
    return out
