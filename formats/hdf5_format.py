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

Reading reads nothing outside the file (external links, external storage and
virtual datasets are refused), walks each group once, and bounds every shape by
what the file stores (:func:`_check_storage`) before describing a tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from . import checkpoint, dtypes
from .atomic import atomic_output
from .checkpoint import ALIASES_KEY, Checkpoint, LazyTensor, from_records, tensor_bytes
from .errors import FormatError, UnsupportedError, UsageError
from .options import DEFAULT_OPTIONS, WriteOptions

NAME = "hdf5"
EXTENSIONS = (".h5", ".hdf5", ".hdf", ".keras.h5")
DESCRIPTION = "HDF5, nnconv's layout (written) and Keras 3 / legacy Keras layouts (read)"
CAN_WRITE = True
FEATURES = "containers, hard-linked tied weights, metadata, bfloat16/float8 as bit patterns"

SIGNATURE = b"\x89HDF\r\n\x1a\n"
# What h5py raises on a corrupt file: the HDF5 library's failures surface as OSError,
# RuntimeError ("Unspecified error in H5Dget_offset"), KeyError, ValueError or TypeError.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)
PATHS_KEY = "nnconv.paths"
ESCAPE_GROUP = "_nnconv"
COMPRESSIONS = ("gzip", "lzf")
# Bounds on what a dataset may claim (see the module docstring).  Deflate cannot
# expand more than 1032:1 and LZF ~100:1, so a filtered dataset claiming more than
# 1100 bytes per stored byte is crafted (better-compressing filter plugins included).
# Up to 1 MiB may come from fill values alone (datasets created but never written).
MAX_EXPANSION = 1100
FILL_ALLOWANCE = 1 << 20
MAX_LINKS = 2 * checkpoint.MAX_TENSORS  # links walked: the datasets plus the groups holding them
CRAFTED = "the file is corrupt or crafted"
OUTSIDE = "nnconv reads nothing outside the file"


def sniff(path: Path, head: bytes) -> bool:
    return head.startswith(SIGNATURE)


# --- reading ----------------------------------------------------------------


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _children(group):
    """Children in creation order when the group tracks it, else in natural name order."""
    import h5py

    names = list(group.keys())
    gid = group["/"].id if isinstance(group, h5py.File) else group.id  # a FileID has no order
    tracked = gid.get_create_plist().get_link_creation_order()
    return names if tracked else sorted(names, key=_natural)


def _member(group, key: str, subject: Path):
    """``group[key]`` (``None`` for a dangling soft link); links out of the file refused."""
    import h5py

    node = group
    for part in filter(None, key.split("/")):
        link = node.get(part, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            problem = f"{key!r} is an external link to {link.filename!r}"
            raise FormatError(subject, problem, remedy=OUTSIDE)
        try:
            node = node[part]  # follows hard and soft links
        except KeyError as exc:
            if link is None or isinstance(link, h5py.SoftLink):  # absent or dangling
                return None
            raise FormatError(subject, f"cannot open {key!r}: {exc}") from None
    if node.id.fileno != group.id.fileno:  # a soft link through an external link
        problem = f"{key!r} leads into another file through an external link"
        raise FormatError(subject, problem, remedy=OUTSIDE)
    return node


def _walk(f, subject: Path):
    """(path, dataset) of every dataset, depth first in order, without recursion."""
    import h5py

    seen = {f["/"].id: "/"}
    stack = [(f, "", iter(_children(f)))]
    links = 0
    while stack:
        group, prefix, keys = stack[-1]
        key = next(keys, None)
        if key is None:
            stack.pop()
            continue
        links += 1
        if links > MAX_LINKS:
            problem = f"holds more than {MAX_LINKS:,} links"
            raise FormatError(subject, problem, value=links, limit=MAX_LINKS, remedy=CRAFTED)
        obj = _member(group, key, subject)
        path = f"{prefix}{key}"
        if isinstance(obj, h5py.Dataset):
            yield path, obj
        elif isinstance(obj, h5py.Group):
            if obj.id in seen:
                raise FormatError(
                    subject,
                    f"group {path!r} is also linked as {seen[obj.id]!r}",
                    remedy="link cycles and groups linked twice are not supported",
                )
            seen[obj.id] = path
            stack.append((obj, path + "/", iter(_children(obj))))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _keras_list(group, key: str) -> list[str] | None:
    """A Keras list attribute; Keras splits ones over 64 KB into ``key0``, ``key1``..."""
    if key in group.attrs:
        return [_text(v) for v in group.attrs[key]]
    if f"{key}0" not in group.attrs:
        return None
    out, i = [], 0
    while f"{key}{i}" in group.attrs:
        out += [_text(v) for v in group.attrs[f"{key}{i}"]]
        i += 1
    return out


def _keras_legacy(root, layers: list[str], subject: Path):
    """(path, name, dataset) in Keras' order; names are Keras' ``weight_names``."""
    for layer in layers:
        group = _member(root, layer, subject)
        for weight in (_keras_list(group, "weight_names") or []) if group else []:
            ds = _member(group, weight, subject)
            if ds is None:
                raise KeyError(f"weight {weight!r} of layer {layer!r} is missing")
            yield f"{group.name}/{weight}".lstrip("/"), weight, ds


def _layout(f, subject: Path) -> tuple[str, list]:
    """Which layout the file has, and its (path, name, dataset) triples in order."""
    for root in (f, _member(f, "model_weights", subject) if "model_weights" in f else None):
        layers = None if root is None else _keras_list(root, "layer_names")
        if layers is not None:
            triples = list(_keras_legacy(root, layers, subject))
            checkpoint.check_count(str(subject), len(triples))
            return "keras-legacy", triples
    pairs = list(_walk(f, subject))
    keras3 = ("layers" in f or "vars" in f) and "nnconv.version" not in f.attrs
    if keras3 and all("/vars/" in "/" + p for p, _ in pairs):
        return "keras3", [(p, p, ds) for p, ds in pairs]  # Keras 3 names are their paths
    layout = "nnconv" if "nnconv.version" in f.attrs else "hdf5"
    return layout, [(p, p.replace("/", "."), ds) for p, ds in pairs]


def _dtype_of(path: Path, name: str, ds) -> dtypes.DType:
    import numpy as np

    declared = ds.attrs.get("dtype")
    if isinstance(declared, bytes):
        declared = declared.decode()
    if isinstance(declared, str) and declared in dtypes.DTYPES:
        spec = dtypes.DTYPES[declared]
        if spec.bit_pattern and np.dtype(spec.numpy).itemsize == ds.dtype.itemsize:
            return spec
    native = ds.dtype.newbyteorder("<") if ds.dtype.byteorder == ">" else ds.dtype
    for spec in dtypes.BY_NUMPY.values():
        if np.dtype(spec.numpy) == native:
            return spec
    raise UnsupportedError(path, f"dataset {name!r} has HDF5 type {ds.dtype}, not a tensor dtype")


def _check_storage(path: Path, name: str, ds, itemsize: int, file_size: int) -> None:
    """Refuse data kept outside the file, and shapes claiming more than the file stores.

    Values are read lazily, one whole dataset per ``load()``: this check is what keeps
    a crafted shape from allocating terabytes.  Contiguous unfiltered data must lie
    inside the file; other layouts (chunked, compressed, unallocated) may not expand
    more than :data:`MAX_EXPANSION` times their stored bytes plus :data:`FILL_ALLOWANCE`.
    """
    import h5py

    if ds.external or ds.is_virtual:
        where = "external raw files" if ds.external else "a virtual dataset's sources"
        raise FormatError(path, f"dataset {name!r} keeps its values in {where}", remedy=OUTSIDE)
    if ds.shape is None:
        raise UnsupportedError(path, f"dataset {name!r} has no shape (an empty dataspace)")
    nbytes = dtypes.numel(tuple(ds.shape)) * itemsize
    stored = ds.id.get_storage_size()
    plist = ds.id.get_create_plist()
    contiguous = plist.get_layout() == h5py.h5d.CONTIGUOUS and not plist.get_nfilters()
    if contiguous and stored:
        end = (ds.id.get_offset() or 0) + nbytes
        if stored != nbytes or end > file_size:
            raise FormatError(
                path,
                f"dataset {name!r}: shape {tuple(ds.shape)} needs {nbytes:,} bytes up to offset "
                f"{end:,}, the file has {file_size:,}",
                value=end,
                limit=file_size,
                remedy="the file is truncated or corrupt",
            )
    elif stored > file_size or nbytes > MAX_EXPANSION * stored + FILL_ALLOWANCE:
        limit = min(stored, file_size) * MAX_EXPANSION + FILL_ALLOWANCE
        problem = (
            f"dataset {name!r}: shape {tuple(ds.shape)} claims {nbytes:,} bytes from "
            f"{stored:,} stored (more than {MAX_EXPANSION}x expansion)"
        )
        raise FormatError(path, problem, value=nbytes, limit=limit, remedy=CRAFTED)


def _load(path: Path, name: str, ds, spec: dtypes.DType):
    import numpy as np
    import torch

    try:
        raw = np.asarray(ds[()])
    except H5_ERRORS as exc:
        raise FormatError(path, f"dataset {name!r}: cannot read: {exc}") from None
    if spec.bit_pattern and raw.dtype.kind == "V":  # ml_dtypes arrays land as opaque bytes
        arr = np.ascontiguousarray(raw).view(np.dtype(spec.numpy))
    else:
        arr = np.ascontiguousarray(raw, dtype=np.dtype(spec.numpy))
    t = torch.from_numpy(arr.reshape(ds.shape))
    return t.view(getattr(torch, spec.name)) if spec.bit_pattern else t


def read(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FormatError(path, f"not a readable HDF5 file: {exc}") from None
    ckpt = Checkpoint(tensors={}, structure=None, format=NAME, source=str(path))
    ckpt._closers.append(f.close)
    try:
        file_size = os.path.getsize(path)
        records = {k: _text(v) for k, v in f.attrs.items() if isinstance(v, str | bytes)}
        layout, pairs = _layout(f, path)
        renamed = {p: n for n, p in _json_map(path, records.pop(PATHS_KEY, "{}")).items()}
        # Hard links are one dataset under several names: one tensor plus aliases.
        # The canonical name is the one nnconv's record does not list as an alias.
        recorded = _json_map(path, records.get(ALIASES_KEY, "{}"))
        by_dataset: dict = {}
        for hpath, default, ds in pairs:
            if not isinstance(ds, h5py.Dataset):  # a Keras weight name pointing at a group
                raise FormatError(path, f"{hpath!r} is a {type(ds).__name__}, not a dataset")
            by_dataset.setdefault(ds.id, (ds, []))[1].append(renamed.get(hpath, default))
        aliases: dict[str, str] = {}
        for ds, names in by_dataset.values():
            name = next((n for n in names if n not in recorded), names[0])
            aliases.update({other: name for other in names if other != name})
            spec = _dtype_of(path, name, ds)
            _check_storage(path, name, ds, spec.itemsize, file_size)
            ckpt.tensors[name] = LazyTensor(
                spec.name,
                tuple(ds.shape),
                lambda n=name, ds=ds, spec=spec: _load(path, n, ds, spec),
            )
        if aliases and ALIASES_KEY not in records:
            records[ALIASES_KEY] = json.dumps(aliases)
        ckpt.structure, ckpt.aliases, ckpt.metadata = from_records(
            str(path), records, list(ckpt.tensors)
        )
        if layout != "nnconv":
            ckpt.metadata["nnconv.layout"] = layout
    except H5_ERRORS as exc:
        ckpt.close()
        raise FormatError(path, f"corrupt HDF5 file: {exc}") from None
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
    with atomic_output(Path(path), force=options.force) as tmp, _h5_errors():
        _write_h5(h5py.File(tmp, "w", track_order=True), ckpt, names, paths, records, options)


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
