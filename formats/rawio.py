"""Moving and comparing tensor bytes without torch: the route to the speed of ``cp``.

Where a source stores a tensor as raw little-endian bytes (a :class:`Span`), a
writer places those bytes straight into the destination at a precomputed
offset: ``os.copy_file_range`` copies inside the kernel, and a writer that
must checksum (the torch zip format's CRC-32) reads them once through a
memory map.  Tensors without a span (inline ONNX initializers, casts, modules) fall
back to their torch values.  Nothing here holds more than one tensor's bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import zlib
from collections.abc import Iterator

from .checkpoint import LazyTensor, Span, tensor_bytes
from .errors import FormatError

CHUNK = 64 << 20  # bytes per mapped slice when a tensor's bytes are read in pieces
COMPARE_CHUNK = 1 << 20  # bytes per comparison step: stays in the CPU cache
SMALL = 256 << 10  # tensors below this are gathered into batched writes (see Placer)
BATCH = 8 << 20  # bytes gathered before one write
MAX_OPEN = 2  # source files open at once: a sharded source is read shard by shard
# copy_file_range refuses some pairs (other file systems on old kernels, special files).
NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


class MappedFile:
    """A private (copy-on-write) memory map of one file, opened on first use.

    Tensors made from it are views of the map: alive, they keep it open; a
    caller writing into one changes its own copy of the page, never the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path, self.map = path, None

    def tensor(self, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int, *, view=None):
        """The ``nbytes`` at ``offset`` as a ``dtype`` tensor of ``shape``; ``view`` =
        (stride, element offset) takes a strided view of those bytes instead."""
        import torch

        torch_dtype = getattr(torch, dtype)
        if not nbytes:
            return torch.empty(shape, dtype=torch_dtype)
        if self.map is None:
            with open(self.path, "rb") as fh:
                self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=offset)
        if offset % flat.new_empty(0, dtype=torch_dtype).element_size():
            flat = flat.clone()  # an unaligned record (foreign zip writers): a copy
        values = flat.view(torch_dtype)
        if view is None:
            return values.reshape(shape)
        stride, element_offset = view
        return values.as_strided(shape, stride, element_offset)


class SpanReader:
    """The source files of one write or comparison, each opened and mapped once."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, mmap.mmap | None]] = {}
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._buffers: tuple[bytearray, bytearray] | None = None
        self._last: tuple[str, mmap.mmap] | None = None  # the file mapping() gave last

    def __enter__(self) -> SpanReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for path in list(self._files):
            self._close(path)

    def _close(self, path: str) -> None:
        if self._last is not None and self._last[0] == path:
            self._last = None
        fd, mapping = self._files.pop(path)
        if mapping is not None:
            with contextlib.suppress(BufferError):  # a view kept alive by a traceback:
                mapping.close()  # the map closes when that view goes
        os.close(fd)

    def _open(self, span: Span) -> tuple[int, mmap.mmap | None]:
        entry = self._files.pop(span.path, None)  # re-inserted below: most recent last
        if entry is None:
            if len(self._files) >= MAX_OPEN:  # shard by shard: the oldest source is done
                self._close(next(iter(self._files)))
            fd = os.open(span.path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
            entry = (fd, mapping)
        self._files[span.path] = entry
        if entry[1] is None or span.offset + span.nbytes > len(entry[1]):
            raise FormatError(
                span.path,
                f"tensor bytes {span.offset}..{span.offset + span.nbytes} lie past the end of "
                "the file",
                remedy="the file was truncated or changed while nnconv read it",
            )
        return entry

    def mapping(self, span: Span) -> mmap.mmap | bytes:
        """The span's file, mapped and checked to hold the span (no copy)."""
        last = self._last
        if last is not None and span.path == last[0] and span.offset + span.nbytes <= len(last[1]):
            return last[1]  # the usual case: the file of the previous tensor
        if not span.nbytes:
            return b""
        mapping = self._open(span)[1]
        self._last = (span.path, mapping)
        return mapping

    def view(self, span: Span) -> memoryview:
        """The span's bytes, mapped (no copy); release it before :meth:`close`."""
        return memoryview(self.mapping(span))[span.offset : span.offset + span.nbytes]

    def chunks(
        self, lazy: LazyTensor, *, name: str = "tensor", size: int = CHUNK
    ) -> Iterator[memoryview]:
        """A tensor's bytes in order: mapped slices of its span, else its loaded values."""
        if lazy.span is None:
            data = tensor_bytes(lazy.load())
            if len(data) != lazy.nbytes:
                raise FormatError(None, f"{name!r} loaded {len(data)} bytes, not {lazy.nbytes}")
            yield data
            return
        view = self.view(lazy.span)
        try:
            for start in range(0, len(view), size):
                piece = view[start : start + size]
                try:
                    yield piece
                finally:
                    piece.release()
        finally:
            view.release()

    def write_at(
        self, fd: int, offset: int, lazy: LazyTensor, *, name: str = "tensor", crc: bool = False
    ) -> int:
        """Place a tensor's bytes at ``offset`` of ``fd``; return their CRC-32 (0 unless
        ``crc``).  Spans are copied in the kernel; a checksum reads them once, mapped."""
        if lazy.span is not None and self._kernel_copy:
            checksum = 0
            if crc:
                with contextlib.closing(self.chunks(lazy, name=name)) as pieces:
                    for piece in pieces:
                        checksum = zlib.crc32(piece, checksum)
            try:
                self._kernel_copy_span(lazy.span, fd, offset)
                return checksum
            except OSError as exc:
                if exc.errno not in NO_KERNEL_COPY:
                    raise
                self._kernel_copy = False
        checksum = 0
        with contextlib.closing(self.chunks(lazy, name=name)) as pieces:
            for piece in pieces:
                if crc:
                    checksum = zlib.crc32(piece, checksum)
                write_all(fd, piece, offset)
                offset += len(piece)
        return checksum

    def _kernel_copy_span(self, span: Span, fd: int, offset: int) -> None:
        src, _ = self._open(span)
        done = 0
        while done < span.nbytes:
            n = os.copy_file_range(
                src, fd, min(span.nbytes - done, 1 << 30), span.offset + done, offset + done
            )
            if n == 0:
                raise FormatError(span.path, "file ended while its tensor bytes were copied")
            done += n

    def equal(self, a: Span, b: Span) -> bool:
        """True when two spans hold the same bytes.  Read into two small reused buffers
        and compared with memcmp: faster than mapping, whose first touch of each page
        costs more than copying it (measured: 0.1 s against 0.5 s for 2 x 400 MB)."""
        if a.nbytes != b.nbytes:
            return False
        (fa, _), (fb, _) = self._open(a), self._open(b)
        if self._buffers is None:
            self._buffers = (bytearray(COMPARE_CHUNK), bytearray(COMPARE_CHUNK))
        x, y = self._buffers
        for start in range(0, a.nbytes, COMPARE_CHUNK):
            n = min(COMPARE_CHUNK, a.nbytes - start)
            if n < COMPARE_CHUNK:
                x, y = bytearray(n), bytearray(n)
            for fd, buf, span in ((fa, x, a), (fb, y, b)):
                if os.preadv(fd, [buf], span.offset + start) != n:
                    raise FormatError(span.path, "file ended while its tensor bytes were read")
            if x != y:
                return False
        return True


class Placer:
    """Writes one output file: small pieces (headers, small tensors) gathered into one
    ``pwrite`` per :data:`BATCH` bytes, large tensors copied on their own.

    A checkpoint of 50,000 optimizer-state vectors would otherwise pay a system
    call per tensor.  Pieces may land anywhere: one that neither continues nor
    rewrites the gathered window flushes it first, so no byte is written unless put.
    """

    def __init__(self, reader: SpanReader, fd: int) -> None:
        self.reader, self.fd = reader, fd
        self.buf, self.at = bytearray(), 0

    def __enter__(self) -> Placer:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.flush()

    def put(self, offset: int, data: bytes | memoryview) -> None:
        rel = offset - self.at
        if not self.buf or rel < 0 or rel > len(self.buf):  # not touching the window
            self.flush()
            self.at, rel = offset, 0
        if rel == len(self.buf):
            self.buf += data
        else:  # rewriting gathered bytes (a zip header once its CRC is known)
            self.buf[rel : rel + len(data)] = data
        if len(self.buf) >= BATCH:
            self.flush()

    def tensor(self, offset: int, lazy: LazyTensor, *, name: str, crc: bool = False) -> int:
        """Place a tensor's bytes at ``offset``; their CRC-32 when ``crc`` (else 0)."""
        if lazy.nbytes >= SMALL:
            self.flush()
            return self.reader.write_at(self.fd, offset, lazy, name=name, crc=crc)
        span = lazy.span
        if span is not None:  # the common small case, without the chunk generator
            data = self.reader.mapping(span)[span.offset : span.offset + span.nbytes]
            if self.buf and offset == self.at + len(self.buf) and len(self.buf) < BATCH:
                self.buf += data  # put()'s usual case, inline: one call less per tensor
            else:
                self.put(offset, data)
            return zlib.crc32(data) if crc else 0
        checksum = 0
        with contextlib.closing(self.reader.chunks(lazy, name=name)) as pieces:
            for piece in pieces:
                checksum = zlib.crc32(piece, checksum) if crc else 0
                self.put(offset, piece)
                offset += len(piece)
        return checksum

    def flush(self) -> None:
        if self.buf:
            write_all(self.fd, self.buf, self.at)
            self.buf.clear()


_FALLOCATE: list = []  # [libc's fallocate, or None]: looked up once


def preallocate(fd: int, size: int) -> None:
    """Reserve the blocks of a new output of ``size`` bytes at once (``fallocate(2)``, Linux).

    The copies then fill allocated extents instead of allocating block by block: measured
    on ext4, 2 GiB placed with ``copy_file_range`` took 0.78x the wall and 0.8x the system
    time (median of 10 alternated pairs).  A full disk or a file-size limit fails here, before
    any copy; where the call is missing or the file system cannot (tmpfs on old kernels,
    network file systems) nothing is reserved.  ``os.posix_fallocate`` is not used: where
    the file system cannot, glibc writes zeros over the whole size instead."""
    if not _FALLOCATE:
        try:
            function = ctypes.CDLL(None, use_errno=True).fallocate
            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            function.restype = ctypes.c_int
        except (OSError, AttributeError):
            function = None
        _FALLOCATE.append(function)
    function = _FALLOCATE[0]
    if function is None or size <= 0:
        return
    if function(fd, 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise OSError(code, os.strerror(code))


def write_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """``os.pwrite`` until every byte is written (it may write fewer)."""
    with memoryview(data) as whole, whole.cast("B") as view:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                n = os.pwrite(fd, rest, offset + done)
            if n == 0:
                raise OSError(errno.EIO, "short write (disk full or file size limit?)")
            done += n
