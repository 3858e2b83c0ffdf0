"""nnconv's HDF5 layout made with libhdf5's own calls, for writers that place the bytes.

:class:`Layout` creates the groups (one per dotted level, link and attribute
creation order tracked and indexed, as ``create_group(track_order=True)``
makes them), hard links for aliases, and datasets with a contiguous layout
whose space libhdf5 allocates at once and never fills (``ALLOC_TIME_EARLY``,
``FILL_TIME_NEVER``, no object times).  :meth:`Layout.dataset` returns where
the dataset's bytes go; the caller writes them there after closing the file.

This is the per-tensor cost of an HDF5 write, so property lists, types and
dataspaces are made once, and groups and datasets are created by calling the
libhdf5 that h5py loaded through ctypes, under h5py's lock: h5py's wrappers
(an object and a registry entry per identifier) cost as much as libhdf5's own
work.  Where that library cannot be found for certain (not Linux, or not the
instance h5py uses), the same calls go through h5py's low-level API.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re

from .. import dtypes, rawio
from ..checkpoint import LazyTensor, Span

RUN_TENSOR = 1 << 20  # tensors below this size whose bytes follow each other in the source
RUN_BYTES = 64 << 20  # and in the destination are copied together, up to this much at once
H5P_DEFAULT = 0
HADDR_UNDEF = (1 << 64) - 1
_LIB: list = []  # [the ctypes library, or None]: looked up once


def _encoded(name: str) -> tuple[bytes, bool]:
    """The name's bytes as h5py stores them, and whether they are UTF-8 (else ASCII)."""
    try:
        return name.encode("ascii"), False
    except UnicodeEncodeError:
        return name.encode("utf-8"), True


def _libhdf5():
    """The libhdf5 mapped into this process (h5py's), through ctypes; None if unsure."""
    if _LIB:
        return _LIB[0]
    lib = None
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split(None, 5)[-1].strip() for line in fh if "libhdf5" in line}
        paths = {p for p in paths if re.search(r"/libhdf5(-[0-9a-f]+)?\.so", p)}
        if len(paths) == 1:
            lib = ctypes.CDLL(paths.pop())
            hid, char_p = ctypes.c_int64, ctypes.c_char_p
            for name, restype, argtypes in (
                ("H5Iget_type", ctypes.c_int, [hid]),
                ("H5Iinc_ref", ctypes.c_int, [hid]),
                ("H5Gcreate2", hid, [hid, char_p, hid, hid, hid]),
                ("H5Gclose", ctypes.c_int, [hid]),
                ("H5Dcreate2", hid, [hid, char_p, hid, hid, hid, hid, hid]),
                ("H5Dget_offset", ctypes.c_uint64, [hid]),
                ("H5Dclose", ctypes.c_int, [hid]),
                ("H5Acreate2", hid, [hid, char_p, hid, hid, hid, hid]),
                ("H5Awrite", ctypes.c_int, [hid, hid, ctypes.c_void_p]),
                ("H5Aclose", ctypes.c_int, [hid]),
            ):
                function = getattr(lib, name)
                function.restype, function.argtypes = restype, argtypes
    except (OSError, AttributeError):
        lib = None
    _LIB.append(lib)
    return lib


class Layout:
    """Groups, datasets and hard links of one HDF5 file open for writing (an h5py File).

    Use it as a context manager around the writing, inside the ``with`` of the file:
    it holds h5py's lock and closes the groups it opened when it exits.
    """

    def __init__(self, f) -> None:
        import h5py
        import numpy as np
        from h5py import h5d, h5i, h5p, h5s, h5t

        self.h5py, self.np, self.f = h5py, np, f
        self.lib = _libhdf5()
        if self.lib is not None and self.lib.H5Iget_type(f.id.id) != h5i.FILE:
            self.lib = None  # another instance of the library than h5py's: not ours to call
        self.groups: dict[str, object] = {"": f.id.id if self.lib else f.id}
        order = h5p.CRT_ORDER_TRACKED | h5p.CRT_ORDER_INDEXED
        self.gcpl = h5p.create(h5p.GROUP_CREATE)
        self.gcpl.set_link_creation_order(order)
        self.gcpl.set_attr_creation_order(order)
        self.gcpl.set_obj_track_times(False)
        self.dcpl = h5p.create(h5p.DATASET_CREATE)
        self.dcpl.set_layout(h5d.CONTIGUOUS)
        self.dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
        self.dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
        self.dcpl.set_obj_track_times(False)
        self.lcpls = {}
        for utf8 in (False, True):  # what h5py's Group._e(name, lcpl=True) gives
            lcpl = self.lcpls[utf8] = h5p.create(h5p.LINK_CREATE)
            lcpl.set_create_intermediate_group(True)
            lcpl.set_char_encoding(h5t.CSET_UTF8 if utf8 else h5t.CSET_ASCII)
        self.types: dict[str, object] = {}
        self.spaces: dict[tuple[int, ...], object] = {}
        self.scalar = h5s.create(h5s.SCALAR)
        self.text = h5py.string_dtype("utf-8")
        self.text_type = h5t.py_create(self.text, logical=True)
        self.lock = getattr(h5py._objects, "phil", None) or contextlib.nullcontext()

    def __enter__(self) -> Layout:
        self.lock.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for path, gid in self.groups.items():
                if path and self.lib is not None:
                    self.lib.H5Gclose(gid)
                elif path:
                    gid.close()
            self.groups = {"": self.groups[""]}
        finally:
            self.lock.__exit__(*exc)

    def group(self, path: str):
        """The group at ``path`` (its identifier), created with its parents as needed."""
        gid = self.groups.get(path)
        if gid is None:
            parent, _, leaf = path.rpartition("/")
            name, utf8 = _encoded(leaf)
            loc, lcpl = self.group(parent), self.lcpls[utf8]
            if self.lib is None:
                gid = self.h5py.h5g.create(loc, name, lcpl=lcpl, gcpl=self.gcpl)
            else:
                gid = self.lib.H5Gcreate2(loc, name, lcpl.id, self.gcpl.id, H5P_DEFAULT)
                if gid < 0:  # h5py, trying again, raises libhdf5's error as usual
                    self.h5py.h5g.create(self._wrapped(loc), name, lcpl=lcpl, gcpl=self.gcpl)
                    raise RuntimeError(f"cannot create group {path!r} (H5Gcreate2)")
            self.groups[path] = gid
        return gid

    def dataset(self, hpath: str, spec: dtypes.DType, shape: tuple[int, ...]) -> int | None:
        """Create the dataset; return the file offset of its bytes (None when it has none)."""
        tid = self.types.get(spec.name)
        if tid is None:
            tid = self.h5py.h5t.py_create(self.np.dtype(spec.numpy), logical=True)
            self.types[spec.name] = tid
        sid = self.spaces.get(shape)
        if sid is None:
            sid = self.h5py.h5s.create_simple(shape) if shape else self.scalar
            self.spaces[shape] = sid
        parent, _, leaf = hpath.rpartition("/")
        loc, name = self.group(parent), _encoded(leaf)[0]
        lib, offset = self.lib, None
        dsid = -1
        if lib is not None:
            dsid = lib.H5Dcreate2(loc, name, tid.id, sid.id, H5P_DEFAULT, self.dcpl.id, 0)
        if dsid >= 0:
            try:
                if spec.bit_pattern:
                    self._dtype_attribute(dsid, spec.name)
                if dtypes.numel(shape):
                    offset = lib.H5Dget_offset(dsid)
                    offset = None if offset == HADDR_UNDEF else offset
            finally:
                lib.H5Dclose(dsid)
        else:  # without ctypes, or to raise libhdf5's error as h5py does
            ds = self.h5py.h5d.create(self._wrapped(loc), name, tid, sid, dcpl=self.dcpl)
            try:
                if spec.bit_pattern:  # what ds.attrs["dtype"] = spec.name writes
                    aid = self.h5py.h5a.create(ds, b"dtype", self.text_type, self.scalar)
                    aid.write(self.np.array(spec.name, dtype=self.text))
                    aid.close()
                offset = ds.get_offset() if dtypes.numel(shape) else None
            finally:
                ds.close()
        if offset is None and dtypes.numel(shape):
            raise RuntimeError(f"libhdf5 allocated no space for dataset {hpath!r}")
        return offset

    def _dtype_attribute(self, dsid: int, value: str) -> None:
        lib = self.lib
        aid = lib.H5Acreate2(dsid, b"dtype", self.text_type.id, self.scalar.id, 0, 0)
        if aid < 0:
            raise RuntimeError(f"cannot create the dtype attribute {value!r} (H5Acreate2)")
        try:
            text = (ctypes.c_char_p * 1)(value.encode())
            if lib.H5Awrite(aid, self.text_type.id, ctypes.cast(text, ctypes.c_void_p)) < 0:
                raise RuntimeError(f"cannot write the dtype attribute {value!r} (H5Awrite)")
        finally:
            lib.H5Aclose(aid)

    def _wrapped(self, loc):
        """An h5py object for a group identifier; one of ours gets a reference of its own,
        which the h5py object gives back when it goes."""
        if not isinstance(loc, int):
            return loc
        self.lib.H5Iinc_ref(loc)
        return self.h5py.h5i.wrap_identifier(loc)

    def link(self, hpath: str, target: str) -> None:
        """A hard link at ``hpath`` to the object at ``target``."""
        parent, _, leaf = hpath.rpartition("/")
        name, utf8 = _encoded(leaf)
        group = self._wrapped(self.group(parent))
        group.links.create_hard(name, self.f.id, target.encode("utf-8"), lcpl=self.lcpls[utf8])


def place(path, placed, progress=None) -> None:
    """Write each tensor's bytes at its offset in the closed HDF5 file ``path``: one
    :class:`rawio.SpanReader` (kernel copies of spans, torch values for the rest)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        rawio.preallocate(fd, os.fstat(fd).st_size)  # libhdf5 left the datasets as holes
        with rawio.SpanReader() as reader:
            done = 0
            for names, lazy, offset, nbytes in _runs(placed):
                if offset is not None:
                    reader.write_at(fd, offset, lazy, name=names[0])
                for size in nbytes:
                    done += size
                    if progress:
                        progress(done)
    finally:
        os.close(fd)


def _runs(placed):
    """(names, what to write, offset, their sizes): small spanned tensors that lie one after
    the other in one source and in the HDF5 file (libhdf5 packs small datasets' bytes
    together) are one copy; the others are written one by one."""
    run: list | None = None  # [names, sizes, source path, source offset, offset, nbytes]
    for name, lazy, offset in placed:
        span = lazy.span if offset is not None and lazy.nbytes < RUN_TENSOR else None
        if span is not None and span.nbytes != lazy.nbytes:
            span = None
        if (
            run is not None
            and span is not None
            and (span.path, span.offset, offset) == (run[2], run[3] + run[5], run[4] + run[5])
            and run[5] + span.nbytes <= RUN_BYTES
        ):
            run[0].append(name)
            run[1].append(span.nbytes)
            run[5] += span.nbytes
            continue
        if run is not None:
            yield _run(*run)
            run = None
        if span is not None:
            run = [[name], [span.nbytes], span.path, span.offset, offset, span.nbytes]
        elif lazy.span is not None and lazy.span.nbytes != lazy.nbytes:  # torch values
            yield [name], LazyTensor(lazy.dtype, lazy.shape, lazy.load), offset, [lazy.nbytes]
        else:
            yield [name], lazy, offset, [lazy.nbytes]
    if run is not None:
        yield _run(*run)


def _run(names, sizes, path, start, offset, nbytes):
    whole = LazyTensor("uint8", (nbytes,), _no_load, span=Span(path, start, nbytes))
    return names, whole, offset, sizes


def _no_load():
    raise AssertionError("a run of spans is copied, never loaded")
