"""HDF5: nnconv's layout (one group per level of the dotted name) and Keras' layouts.

nnconv writes ``hidden.weight`` as dataset ``hidden/weight`` in groups created
with ``track_order=True``; bfloat16 and float8 have no HDF5 type, so they are
stored as their bit patterns with a ``dtype`` attribute (Keras 3's convention
for bfloat16).  Tied weights are HDF5 hard links to one dataset.  Names that
cannot be HDF5 paths (empty parts, ``/``, a name that is also a prefix of
another) go under ``/_nnconv/`` and the root attribute ``nnconv.paths`` maps them.

Reading also accepts Keras 3 ``*.weights.h5`` (named by their HDF5 paths,
``layers/<name>/vars/<i>``) and legacy Keras ``.h5`` (named by Keras'
``weight_names``, ``dense/kernel:0``): Keras' own names, unchanged.  Other HDF5
files are named by their dataset paths with ``/`` shown as ``.``.

Reading opens only regular files, reads nothing outside the file (external links,
external storage and virtual datasets are refused before libhdf5 could open their
targets: nnconv follows links itself, :mod:`.hdf5_chunks`), walks each group once,
and bounds every shape by what the file stores (:func:`_check_storage`).

libhdf5 loops forever or crashes on some corrupt files, so the metadata is read
in a worker process with CPU, memory and time limits (:mod:`.hdf5_probe`).
Contiguous unfiltered little-endian datasets get a :class:`Span` and load from a
memory map, without libhdf5.  Chunked datasets are read raw, chunk by chunk, and
decoded by nnconv, each chunk bounded by its own size (a deflate bomb stops
there); libhdf5 in this process reads only compact or contiguous values (bounded
by the file) and writes.

Writing creates every dataset with a contiguous layout allocated at once and
never filled, records where libhdf5 put it, closes the file, then places each
tensor's bytes there itself (kernel copies of source spans, :mod:`.rawio`):
no torch when every tensor has a span.  ``--compression`` writes chunked
datasets through h5py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from .. import checkpoint, dtypes, rawio
from ..adapter import Capabilities
from ..atomic import atomic_output
from ..checkpoint import Checkpoint, LazyTensor, Span, from_records, tensor_bytes
from ..errors import FormatError, UnsupportedError, UsageError
from ..keys import ALIASES_KEY, PATHS_KEY
from ..options import DEFAULT_OPTIONS, WriteOptions
from . import hdf5_chunks, hdf5_layout, hdf5_probe

NAME = "hdf5"
EXTENSIONS = (".h5", ".hdf5", ".hdf", ".keras.h5")
DESCRIPTION = "HDF5, nnconv's layout (written) and Keras 3 / legacy Keras layouts (read)"
CAPABILITIES = Capabilities(writes=True, write_options=frozenset({"compression"}))
FEATURES = "containers, hard-linked tied weights, metadata, bfloat16/float8 as bit patterns"

SIGNATURE = b"\x89HDF\r\n\x1a\n"
# What h5py raises on a corrupt file: the HDF5 library's failures surface as OSError,
# RuntimeError ("Unspecified error in H5Dget_offset"), KeyError, ValueError or TypeError.
H5_ERRORS = hdf5_probe.H5_ERRORS
ESCAPE_GROUP = "_nnconv"
COMPRESSIONS = ("gzip", "lzf")
# Bounds on what a dataset may claim (see the module docstring).  Deflate cannot
# expand more than 1032:1 and LZF ~100:1, so a filtered dataset claiming more than
# 1100 bytes per stored byte is crafted (better-compressing filter plugins included).
# Up to 1 MiB may come from fill values alone (datasets created but never written).
MAX_EXPANSION = 1100
FILL_ALLOWANCE = 1 << 20
MAX_LINKS = 2 * checkpoint.MAX_TENSORS  # links walked: the datasets plus the groups holding them
CRAFTED, OUTSIDE = hdf5_chunks.CRAFTED, hdf5_chunks.OUTSIDE


def sniff(path: Path, head: bytes) -> bool:
    return head.startswith(SIGNATURE)


# --- reading ----------------------------------------------------------------


def _describe(path: Path) -> tuple[dict, list]:
    """The worker's description of the file: (records and layout, entries)."""
    try:
        return hdf5_probe.describe(
            str(path), max_links=MAX_LINKS, max_tensors=checkpoint.MAX_TENSORS
        )
    except hdf5_probe.Refusal as exc:
        raise _error(path, exc) from None
    except hdf5_probe.Crash as exc:
        problem = f"{exc.what} reading this file's metadata ({exc.detail})"
        remedy = "check that h5py imports: python -c 'import h5py'" if exc.startup else CRAFTED
        raise FormatError(path, problem, remedy=remedy) from None


_NATIVE: dict[str, dtypes.DType] = {}  # numpy dtype string ("<f4", "|b1") -> DType


def _native(code: str) -> dtypes.DType | None:
    if not _NATIVE:
        import numpy as np

        _NATIVE.update({np.dtype(s.numpy).str: s for s in dtypes.BY_NUMPY.values()})
    return _NATIVE.get(code)


def _dtype_of(path: Path, name: str, facts: dict) -> dtypes.DType:
    declared = facts.get("declared")
    if declared in dtypes.DTYPES:
        spec = dtypes.DTYPES[declared]
        if spec.bit_pattern and spec.itemsize == facts["itemsize"]:
            return spec
    spec = _native(facts["dtype"])
    if spec is None:
        problem = f"dataset {name!r} has HDF5 type {facts['shown']}, not a tensor dtype"
        raise UnsupportedError(path, problem)
    return spec


def _check_storage(path: Path, name: str, facts: dict, itemsize: int, file_size: int) -> None:
    """Refuse data kept outside the file, and shapes claiming more than the file stores.

    Values are read lazily, one whole dataset per ``load()``: this check is what keeps
    a crafted shape from allocating terabytes.  Contiguous unfiltered data must lie
    inside the file; other layouts (chunked, compressed, unallocated) may not expand
    more than :data:`MAX_EXPANSION` times their stored bytes plus :data:`FILL_ALLOWANCE`.
    """
    if facts["external"] or facts["virtual"]:
        where = "external raw files" if facts["external"] else "a virtual dataset's sources"
        raise FormatError(path, f"dataset {name!r} keeps its values in {where}", remedy=OUTSIDE)
    refused = hdf5_chunks.pipeline_problem(facts.get("filters", ()))
    if refused is not None:
        raise _error(path, refused, f"dataset {name!r} ")
    if facts["shape"] is None:
        raise UnsupportedError(path, f"dataset {name!r} has no shape (an empty dataspace)")
    shape = tuple(facts["shape"])
    nbytes = dtypes.numel(shape) * itemsize
    stored = facts["stored"]
    if facts["contiguous"] and stored:
        end = (facts["offset"] or 0) + nbytes
        if stored != nbytes or end > file_size:
            raise FormatError(
                path,
                f"dataset {name!r}: shape {shape} needs {nbytes:,} bytes up to offset "
                f"{end:,}, the file has {file_size:,}",
                value=end,
                limit=file_size,
                remedy="the file is truncated or corrupt",
            )
    elif stored > file_size or nbytes > MAX_EXPANSION * stored + FILL_ALLOWANCE:
        limit = min(stored, file_size) * MAX_EXPANSION + FILL_ALLOWANCE
        problem = (
            f"dataset {name!r}: shape {shape} claims {nbytes:,} bytes from "
            f"{stored:,} stored (more than {MAX_EXPANSION}x expansion)"
        )
        raise FormatError(path, problem, value=nbytes, limit=limit, remedy=CRAFTED)


def _span(path: Path, facts: dict, spec: dtypes.DType, nbytes: int) -> Span | None:
    """Where the dataset's values lie as the tensor's raw bytes; None when h5py must read
    them (chunked, filtered, compact, unallocated, or a type libhdf5 would convert)."""
    if not facts["raw"]:
        return None
    if spec.bit_pattern and not facts["opaque"]:
        stored_as = _native(facts["dtype"])
        if stored_as is None or stored_as.numpy != spec.numpy:
            return None  # bits kept in another type (float16...): h5py converts the values
    if not nbytes:
        return Span(str(path), 0, 0)
    if facts["contiguous"] and facts["offset"] is not None and facts["stored"] == nbytes:
        return Span(str(path), facts["offset"], nbytes)
    return None


class _Source:
    """One checkpoint's way to the values: a memory map for spans, h5py for the rest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mapped = rawio.MappedFile(path)
        self.h5, self.size = None, 0

    def tensor(self, spec: dtypes.DType, shape: tuple[int, ...], span: Span):
        try:
            return self.mapped.tensor(spec.name, shape, span.offset, span.nbytes)
        except ValueError:  # torch.frombuffer: the bytes are not all in the file any more
            problem = f"tensor bytes {span.offset}..{span.offset + span.nbytes} lie past its end"
            remedy = "the file was truncated or changed while nnconv read it"
            raise FormatError(self.path, problem, remedy=remedy) from None

    def loader(self, hpath: str, name: str, spec: dtypes.DType, shape: tuple, span):
        if span is not None:
            return lambda: self.tensor(spec, shape, span)
        return lambda: self.load(hpath, name, spec, shape)

    def load(self, hpath: str, name: str, spec: dtypes.DType, shape: tuple[int, ...]):
        """Chunked values decoded by nnconv within each chunk's size, never by libhdf5's
        filters; links followed by nnconv, never out of the file (:mod:`.hdf5_chunks`)."""
        import h5py
        import numpy as np
        import torch

        try:
            if self.h5 is None:
                self.h5, self.size = hdf5_chunks.open_file(h5py, self.path)
            raw = hdf5_chunks.read_values(h5py, self.h5.id, hpath, shape, self.size)
        except hdf5_chunks.Refused as exc:
            raise _error(self.path, exc, f"dataset {name!r}: ") from None
        except H5_ERRORS as exc:
            raise FormatError(self.path, f"dataset {name!r}: cannot read: {exc}") from None
        if spec.bit_pattern and raw.dtype.kind == "V":  # ml_dtypes arrays land as opaque bytes
            arr = np.ascontiguousarray(raw).view(np.dtype(spec.numpy))
        else:
            arr = np.ascontiguousarray(raw, dtype=np.dtype(spec.numpy))
        t = torch.from_numpy(arr.reshape(shape))
        return t.view(getattr(torch, spec.name)) if spec.bit_pattern else t

    def close(self) -> None:
        self.mapped = rawio.MappedFile(self.path)  # tensors alive keep the old map open
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None


def _error(path: Path, exc, prefix: str = ""):
    """A worker's Refusal or an hdf5_chunks.Refused as nnconv's error about ``path``."""
    kind = UnsupportedError if exc.kind == "UnsupportedError" else FormatError
    return kind(path, prefix + exc.problem, value=exc.value, limit=exc.limit, remedy=exc.remedy)


def read(path: Path, *, trust_code: bool = False) -> Checkpoint:
    path = Path(path)
    try:  # stat, never open: libhdf5 would wait on a pipe for ever
        hdf5_chunks.regular_file(path)
    except hdf5_chunks.Refused as exc:
        raise _error(path, exc) from None
    except FileNotFoundError:
        pass  # the worker says so
    info, entries = _describe(path)
    try:
        file_size = os.path.getsize(path)
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None
    ckpt = Checkpoint(tensors={}, structure=None, format=NAME, source=str(path))
    source = _Source(path)
    ckpt._closers.append(source.close)
    try:
        records, layout = info["records"], info["layout"]
        renamed = {p: n for n, p in _json_map(path, records.pop(PATHS_KEY, "{}")).items()}
        # Hard links are one dataset under several names: one tensor plus aliases.
        # The canonical name is the one nnconv's record does not list as an alias.
        recorded = _json_map(path, records.get(ALIASES_KEY, "{}"))
        facts_of: dict[int, dict] = {}
        by_dataset: dict[int, tuple[str, dict, list[str]]] = {}
        for hpath, name, index, facts in entries:
            facts = facts_of.setdefault(index, facts)
            if facts["kind"] != "Dataset":  # a Keras weight name pointing at a group
                raise FormatError(path, f"{hpath!r} is a {facts['kind']}, not a dataset")
            if name is None:  # Keras 3 names are their paths
                name = hpath if layout == "keras3" else hpath.replace("/", ".")
            by_dataset.setdefault(index, (hpath, facts, []))[2].append(renamed.get(hpath, name))
        aliases: dict[str, str] = {}
        for hpath, facts, names in by_dataset.values():
            name = next((n for n in names if n not in recorded), names[0])
            aliases.update({other: name for other in names if other != name})
            if "type_error" in facts:
                raise FormatError(path, f"corrupt HDF5 file: {facts['type_error']}")
            spec = _dtype_of(path, name, facts)
            if "storage_error" in facts:
                raise FormatError(path, f"corrupt HDF5 file: {facts['storage_error']}")
            _check_storage(path, name, facts, spec.itemsize, file_size)
            shape = tuple(facts["shape"])
            span = _span(path, facts, spec, dtypes.numel(shape) * spec.itemsize)
            load = source.loader(hpath, name, spec, shape, span)
            ckpt.tensors[name] = LazyTensor(spec.name, shape, load, span=span)
        if aliases and ALIASES_KEY not in records:
            records[ALIASES_KEY] = json.dumps(aliases)
        ckpt.structure, ckpt.aliases, ckpt.metadata = from_records(
            str(path), records, list(ckpt.tensors)
        )
        if layout != "nnconv":
            ckpt.metadata["nnconv.layout"] = layout
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def _json_map(path: Path, text: str) -> dict:
    """One of nnconv's JSON maps stored as an attribute (malformed: FormatError)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FormatError(path, f"nnconv metadata is not valid JSON: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FormatError(path, "nnconv metadata is not a map of names")
    return value


# --- writing ----------------------------------------------------------------


def _paths(names: list[str]) -> dict[str, str]:
    """Each name's HDF5 path: dotted parts as groups, else an escaped slot."""
    paths: dict[str, str] = {}
    datasets: set[str] = set()
    groups: set[str] = set()
    for i, name in enumerate(names):
        parts = name.split(".")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts))]
        path = "/".join(parts)
        ok = (
            all(p and "/" not in p and "\x00" not in p and p != "." for p in parts)
            and parts[0] != ESCAPE_GROUP
            and path not in datasets
            and path not in groups
            and not any(p in datasets for p in prefixes)
        )
        if not ok:
            path = f"{ESCAPE_GROUP}/{i}"
        else:
            groups.update(prefixes)
        datasets.add(path)
        paths[name] = path
    return paths


def _parent(f, hpath: str):
    """The group that holds ``hpath`` (created, order-tracking, as needed) and the leaf name."""
    parent, _, leaf = hpath.rpartition("/")
    group = f
    for part in parent.split("/") if parent else ():
        group = group[part] if part in group else group.create_group(part, track_order=True)
    return group, leaf


def write(ckpt: Checkpoint, path: Path, *, options: WriteOptions = DEFAULT_OPTIONS) -> None:
    import h5py

    if options.shard_size:
        raise UsageError(path, "--shard-size applies to safetensors only")
    if options.compression not in (None, *COMPRESSIONS):
        raise UsageError(
            path, f"unknown compression {options.compression!r}", remedy="use gzip or lzf"
        )
    names = ckpt.names()
    paths = _paths(names)
    records = ckpt.records()
    renamed = {n: p for n, p in paths.items() if p != n.replace(".", "/")}
    if renamed:
        records[PATHS_KEY] = json.dumps(renamed, ensure_ascii=False)
    with atomic_output(Path(path), force=options.force, fsync=options.fsync) as tmp:
        with _h5_errors():
            f = h5py.File(tmp, "w", track_order=True)
        if options.compression:
            with _h5_errors():
                _write_h5(f, ckpt, names, paths, records, options)
        else:
            _write_raw(tmp, f, ckpt, names, paths, records, options)


@contextlib.contextmanager
def _h5_errors():
    """h5py reports write failures as RuntimeError("... errno = 28 ..."): make them OSErrors
    again so the atomic writer names the destination and the cause (disk full, size limit)."""
    try:
        yield
    except RuntimeError as exc:
        match = re.search(r"errno = (\d+)", str(exc))
        if not match:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code)) from None


def _write_raw(tmp: Path, f, ckpt: Checkpoint, names, paths, records, options) -> None:
    """libhdf5 makes the structure and says where each tensor goes; nnconv puts it there."""
    placed = []
    with _h5_errors(), f:
        for key, value in records.items():
            f.attrs[key] = value
        with hdf5_layout.Layout(f) as layout:
            for name in names:  # tensors first, then aliases as hard links to them
                if name not in ckpt.aliases:
                    lazy = ckpt.tensors[name]
                    spec = dtypes.DTYPES[lazy.dtype]
                    placed.append((name, lazy, layout.dataset(paths[name], spec, lazy.shape)))
            for name, target in ckpt.aliases.items():
                layout.link(paths[name], paths[target])
    hdf5_layout.place(tmp, placed, options.progress)


def _write_h5(f, ckpt: Checkpoint, names, paths, records, options: WriteOptions) -> None:
    import numpy as np

    with f:
        for key, value in records.items():
            f.attrs[key] = value
        done = 0
        # Tensors first, then aliases as hard links to them.
        for name in [n for n in names if n not in ckpt.aliases] + list(ckpt.aliases):
            group, leaf = _parent(f, paths[name])
            if name in ckpt.aliases:
                group[leaf] = f[paths[ckpt.aliases[name]]]
                continue
            lazy = ckpt.tensors[name]
            spec = dtypes.DTYPES[lazy.dtype]
            arr = np.frombuffer(tensor_bytes(lazy.load()), dtype=np.dtype(spec.numpy))
            arr = arr.reshape(lazy.shape)
            compress = options.compression if arr.ndim and arr.size else None
            ds = group.create_dataset(leaf, data=arr, compression=compress)
            if spec.bit_pattern:
                ds.attrs["dtype"] = spec.name
            done += lazy.nbytes
            if options.progress:
                options.progress(done)
