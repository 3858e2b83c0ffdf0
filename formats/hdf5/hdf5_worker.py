"""The HDF5 worker (``python -m nnconv.formats.hdf5_worker``, started by :mod:`hdf5_probe`):
describes one file per JSON request on stdin, answering on its own descriptor, under CPU and
address-space limits renewed every :data:`BATCH` links or datasets (:mod:`proclimits`).  It
imports numpy, h5py and torch-free parts of nnconv.formats, never torch, and reads only the
string attributes nnconv needs.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys

from nnconv.formats import proclimits

from . import hdf5_chunks

MEMORY_FILE_CAP = 16 << 30  # the file-size part of a request's memory, counted up to this
RETIRE = 256 << 20  # a worker that grew this much exits after answering
BATCH = 256  # links or datasets per step (and per message)
SORT_PER_S = 200_000  # names sorted per extra CPU second (groups without creation order)
SEND_PER_S = 64 << 20  # record bytes serialised per extra CPU second
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)  # see hdf5_format
CRAFTED = hdf5_chunks.CRAFTED
LIBHDF5_MALLOC = re.compile(r"memory allocation failed|H5MM_")  # how libhdf5 says malloc failed


class Refusal(Exception):
    """The worker refused the file: an error class name, the problem and its details."""

    def __init__(self, kind: str, problem: str, value=None, limit=None, remedy=None) -> None:
        super().__init__(problem)
        self.kind, self.problem = kind, problem
        self.value, self.limit, self.remedy = value, limit, remedy

    @classmethod
    def of(cls, exc: hdf5_chunks.Refused) -> Refusal:
        return cls(exc.kind, exc.problem, exc.value, exc.limit, exc.remedy)


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Request:
    """One describe request in the worker: it walks the file and streams entries.

    It works on h5py's low-level identifiers: the high-level objects cost several
    times libhdf5's own work per dataset.
    """

    def __init__(self, rid, send, budget: int, max_links: int, max_tensors: int) -> None:
        import h5py
        import numpy as np

        self.h5py, self.np, self.rid, self.send = h5py, np, rid, send
        self.budget, self.max_links, self.max_tensors = budget, max_links, max_tensors
        self.entries: list = []
        self.ticks = 0
        self.fileno = None
        self.root = None
        self.file_size = 0
        self.ids: dict = {}  # (fileno, address) of each dataset described -> its index
        self.raw_types: dict = {}  # numpy dtype string -> h5py TypeID of those bytes
        proclimits.renew_cpu(budget)

    def tick(self) -> None:
        """One unit of work done: every BATCH units, send what is ready and renew the CPU."""
        self.ticks += 1
        if self.ticks >= BATCH:
            self.send({"id": self.rid, "entries": self.entries})
            self.entries, self.ticks = [], 0
            proclimits.renew_cpu(self.budget)

    def refuse(self, problem: str, **details) -> Refusal:
        return Refusal("FormatError", problem, **details)

    def key(self, oid) -> tuple[int, int]:
        info = self.h5py.h5o.get_info(oid)
        return info.fileno, info.addr

    # The walk: the same rules hdf5_format applied in-process with h5py's Group before.

    def children(self, gid) -> list[str]:
        """Children in creation order when the group tracks it, else in natural order."""
        names = []
        for raw in gid:  # h5py's order; one link at a time: each is a tick
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise self.refuse(f"a link name of {len(raw)} bytes is not UTF-8") from None
            self.tick()
        if gid.get_create_plist().get_link_creation_order():
            return names
        proclimits.renew_cpu(self.budget + len(names) // SORT_PER_S)  # a legitimately large group
        return sorted(names, key=_natural)

    def member(self, gid, key: str):
        """(object, its key) at ``key`` under ``gid``; (None, None) for a dangling soft link
        or an absent name.  Links are followed by :func:`hdf5_chunks.lookup`: soft links
        resolved here, external ones refused before libhdf5 could open their targets."""
        try:
            node = hdf5_chunks.lookup(self.h5py, self.root, gid, key)
        except hdf5_chunks.Refused as exc:
            raise Refusal.of(exc) from None
        except KeyError as exc:
            raise self.refuse(f"cannot open {key!r}: {exc}") from None
        return (None, None) if node is None else (node, self.key(node))

    def walk(self, root):
        """(path, dataset, its key) of every dataset, depth first in order, no recursion."""
        seen = {self.key(root): "/"}
        stack = [(root, "", iter(self.children(root)))]
        links = 0
        while stack:
            group, prefix, keys = stack[-1]
            key = next(keys, None)
            if key is None:
                stack.pop()
                continue
            links += 1
            if links > self.max_links:
                problem = f"holds more than {self.max_links:,} links"
                raise self.refuse(problem, value=links, limit=self.max_links, remedy=CRAFTED)
            obj, where = self.member(group, key)
            path = f"{prefix}{key}"
            if isinstance(obj, self.h5py.h5d.DatasetID):
                yield path, obj, where
            elif isinstance(obj, self.h5py.h5g.GroupID):
                if where in seen:
                    raise self.refuse(
                        f"group {path!r} is also linked as {seen[where]!r}",
                        remedy="link cycles and groups linked twice are not supported",
                    )
                seen[where] = path
                stack.append((obj, path + "/", iter(self.children(obj))))
            self.tick()

    def strings(self, oid, name: str, *, scalar: bool):
        """A string attribute's value (str, or a list of str when not ``scalar``); None
        when absent or of another type, whose value is never read."""
        h5py, np = self.h5py, self.np
        raw = name if isinstance(name, bytes) else name.encode()  # h5py lists non-UTF-8 as bytes
        if not h5py.h5a.exists(oid, raw):
            return None
        aid = h5py.h5a.open(oid, raw)
        if aid.get_type().get_class() != h5py.h5t.STRING:
            return None
        shape = aid.shape  # None for an empty dataspace
        if shape is None or scalar != (shape == ()):
            return None
        claimed = aid.get_type().get_size()
        for dim in shape:
            claimed *= dim
        size = self.file_size
        if claimed > size:  # each value is stored in the file: crafted dimensions
            problem = f"attribute {name!r} claims {claimed:,} bytes; the file has {size:,}"
            raise self.refuse(problem, value=claimed, limit=size, remedy=CRAFTED)
        dtype = aid.dtype  # as h5py's AttributeManager reads it: vlen -> str, fixed -> bytes
        values = np.zeros(shape, dtype=dtype)
        aid.read(values, mtype=h5py.h5t.py_create(dtype))
        if h5py.check_string_dtype(dtype).length is None:
            values = [b.decode("utf-8", "surrogateescape") for b in values.flat]
        else:
            values = list(values.flat)
        return _text(values[0]) if scalar else [_text(v) for v in values]

    def names(self, oid, key: str) -> list[str] | None:
        """A Keras name list attribute: None when absent, [] when it holds no values
        (Keras writes an empty float array for a layer without weights); any other
        value that is not an array of strings is refused, never read."""
        h5py = self.h5py
        if not h5py.h5a.exists(oid, key.encode()):
            return None
        aid = h5py.h5a.open(oid, key.encode())
        space = aid.get_space()
        null = space.get_simple_extent_type() == h5py.h5s.NULL
        count = 0 if null else space.get_simple_extent_npoints()
        kind = aid.get_type().get_class()
        if kind == h5py.h5t.STRING and not null and aid.shape != ():
            return self.strings(oid, key, scalar=False)
        if not count:
            return []
        what = "a single string" if kind == h5py.h5t.STRING else f"HDF5 {CLASSES.get(kind, kind)}"
        raise self.refuse(f"Keras attribute {key!r} is not a list of strings ({what})")

    def keras_list(self, gid, key: str) -> list[str] | None:
        """A Keras list attribute; Keras splits ones over 64 KB into ``key0``, ``key1``...
        Bounded in count, each name at most once (checked with a set)."""
        exists = self.h5py.h5a.exists
        out = self.names(gid, key)
        if out is None:
            if not exists(gid, f"{key}0".encode()):
                return None
            out, i = [], 0
            while exists(gid, f"{key}{i}".encode()) and len(out) <= self.max_tensors:
                out += self.names(gid, f"{key}{i}") or []
                i += 1
        if len(out) > self.max_tensors:
            problem = f"Keras attribute {key!r} lists more than {self.max_tensors:,} names"
            raise self.refuse(problem, value=len(out), limit=self.max_tensors, remedy=CRAFTED)
        if len(set(out)) != len(out):  # linear: a set, not list scans
            twice = next(n for n, c in collections.Counter(out).items() if c > 1)
            raise self.refuse(f"Keras attribute {key!r} lists {twice!r} twice", remedy=CRAFTED)
        return out

    def keras_legacy(self, root, layers: list[str]):
        """(path, name, object) in Keras' order; names are Keras' ``weight_names``."""
        seen: dict = {}
        for layer in layers:
            self.tick()
            group, where = self.member(root, layer)
            if not isinstance(group, self.h5py.h5g.GroupID):
                continue
            if where in seen:  # its weights again under other names: N x M entries
                problem = f"Keras layers {seen[where]!r} and {layer!r} are one group"
                raise self.refuse(problem, remedy=CRAFTED)
            seen[where] = layer
            prefix = self.h5py.h5i.get_name(group).decode("utf-8", "replace").lstrip("/")
            for weight in self.keras_list(group, "weight_names") or []:
                obj, where = self.member(group, weight)
                if obj is None:
                    raise KeyError(f"weight {weight!r} of layer {layer!r} is missing")
                yield f"{prefix}/{weight}".lstrip("/"), weight, obj, where

    def describe(self, path: str) -> dict:
        h5py = self.h5py
        try:  # a regular file (stat only: opening a FIFO would block), the one libhdf5 opened
            f, self.file_size = hdf5_chunks.open_file(h5py, path)
        except hdf5_chunks.Refused as exc:
            raise Refusal.of(exc) from None
        except OSError as exc:
            raise self.refuse(f"not a readable HDF5 file: {exc}") from None
        with f:
            root = self.root = h5py.h5g.open(f.id, b"/")
            self.fileno = self.key(root)[0]
            records = {}
            for key in f.attrs:
                value = self.strings(root, key, scalar=True)
                if value is not None:
                    records[key if isinstance(key, str) else _text(key)] = value
            layout = self.layout(root)
            self.send({"id": self.rid, "entries": self.entries})
            self.entries = []
        # The answer may hold a large nnconv.structure record: time to serialise it.
        proclimits.renew_cpu(self.budget + sum(map(len, records.values())) // SEND_PER_S)
        return {"records": records, "layout": layout}

    def has(self, gid, name: str) -> bool:
        """A hard or soft link called ``name`` (followed nowhere)."""
        links = gid.links
        raw = name.encode()
        return links.exists(raw) and links.get_info(raw).type != self.h5py.h5l.TYPE_EXTERNAL

    def layout(self, root) -> str:
        """Which layout the file has; its entries are sent as they are found."""
        legacy_roots = [root]
        if self.has(root, "model_weights"):
            legacy_roots.append(self.member(root, "model_weights")[0])
        for group in legacy_roots:
            layers = None
            if isinstance(group, self.h5py.h5g.GroupID):
                layers = self.keras_list(group, "layer_names")
            if layers is not None:
                for count, found in enumerate(self.keras_legacy(group, layers), 1):
                    if count > self.max_tensors:
                        problem = f"{count:,} tensors exceed nnconv's limit of {self.max_tensors:,}"
                        raise self.refuse(problem, value=count, limit=self.max_tensors)
                    self.add(*found)
                return "keras-legacy"
        nnconv = self.h5py.h5a.exists(root, b"nnconv.version")
        keras3 = (self.has(root, "layers") or self.has(root, "vars")) and not nnconv
        for hpath, obj, where in self.walk(root):
            keras3 = keras3 and "/vars/" in "/" + hpath
            self.add(hpath, None, obj, where)
        return "keras3" if keras3 else "nnconv" if nnconv else "hdf5"

    def add(self, hpath: str, name: str | None, obj, where: tuple) -> None:
        """One entry: [path, name or None, dataset index, facts the first time]."""
        dataset = isinstance(obj, self.h5py.h5d.DatasetID)
        key = where if dataset else ("other", len(self.ids))
        index = self.ids.get(key)
        facts = None
        if index is None:
            index = self.ids[key] = len(self.ids)
            facts = self.facts(obj) if dataset else {"kind": self.kind(obj)}
        self.entries.append([hpath, name, index, facts])
        self.tick()

    def kind(self, obj) -> str:
        """What an object that is not a dataset is, as h5py's high-level classes say."""
        if isinstance(obj, self.h5py.h5g.GroupID):
            return "Group"
        return "Datatype" if isinstance(obj, self.h5py.h5t.TypeID) else type(obj).__name__

    def facts(self, dsid) -> dict:
        """What hdf5_format needs to judge a dataset: type first, then storage."""
        h5py = self.h5py
        out: dict = {"kind": "Dataset"}
        try:
            tid = dsid.get_type()
            dt = tid.dtype
            native = dt.newbyteorder("<") if dt.byteorder == ">" else dt
            out.update(dtype=native.str, shown=str(dt), itemsize=dt.itemsize)
            out["opaque"] = dt.kind == "V"
            out["raw"] = self.raw(tid, native)
            out["declared"] = self.strings(dsid, "dtype", scalar=True)
        except H5_ERRORS as exc:
            out["type_error"] = str(exc)
            return out
        try:
            space = dsid.get_space()
            null = space.get_simple_extent_type() == h5py.h5s.NULL
            out["shape"] = None if null else list(space.shape)
            out["stored"] = dsid.get_storage_size()
            # Only contiguous data stored in the file, allocated, has an offset: then the
            # creation property list (costly to fetch) has nothing more to say.
            out["offset"] = dsid.get_offset()
            out.update(external=False, virtual=False, contiguous=True)
            if out["offset"] is None:
                dcpl = dsid.get_create_plist()
                layout = dcpl.get_layout()
                out["external"] = dcpl.get_external_count() > 0
                out["virtual"] = layout == h5py.h5d.VIRTUAL
                out["contiguous"] = layout == h5py.h5d.CONTIGUOUS and not dcpl.get_nfilters()
                out["filters"] = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
        except H5_ERRORS as exc:
            out["storage_error"] = str(exc)
        return out

    def raw(self, tid, native) -> bool:
        """True when the stored bytes are ``native``'s little-endian bytes as they are."""
        h5t = self.h5py.h5t
        try:
            if tid.get_class() == h5t.OPAQUE:
                return tid.get_size() == native.itemsize
            if native.hasobject or native.byteorder == ">":
                return False
            plain = native.metadata is None and native.fields is None  # no enum, no struct
            expected = self.raw_types.get(native.str) if plain else None
            if expected is None:
                expected = h5t.py_create(native)
                if plain:
                    self.raw_types[native.str] = expected
            return bool(tid.equal(expected))
        except H5_ERRORS:
            return False


CLASSES = {0: "integer", 1: "float", 3: "string", 5: "opaque", 6: "compound", 8: "enum"}


def worker_main() -> int:
    """Answer one JSON request per stdin line until stdin closes."""
    out = os.dup(1)  # the protocol's own descriptor: nothing libhdf5 prints can mix in
    os.dup2(2, 1)
    proclimits.no_core_dumps()
    import warnings

    import h5py  # noqa: F401  (imported once, before the memory bound is set)

    hdf5_chunks.forbid_external_links()  # libhdf5 itself cannot follow one here

    warnings.simplefilter("ignore")

    def send(message: dict) -> None:
        view = memoryview((json.dumps(message) + "\n").encode())
        while view:
            view = view[os.write(out, view) :]

    start = proclimits.vm_size()
    send({"ready": os.getpid()})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        rid = request["id"]
        answer: dict = {"id": rid}
        try:
            size = os.path.getsize(request["path"])
        except OSError:
            size = 0
        extra = request["memory"] + min(request["file_factor"] * size, MEMORY_FILE_CAP)
        proclimits.bound_memory(extra)
        try:
            work = _Request(
                rid, send, request["cpu_s"], request["max_links"], request["max_tensors"]
            )
            answer["done"] = work.describe(request["path"])
        except Refusal as exc:
            answer["error"] = {"kind": exc.kind, "problem": exc.problem, "value": exc.value}
            answer["error"].update(limit=exc.limit, remedy=exc.remedy)
        except MemoryError:
            answer["error"] = {"kind": "memory"}
        except H5_ERRORS as exc:
            problem = f"corrupt HDF5 file: {exc}"
            if LIBHDF5_MALLOC.search(str(exc)):  # a size read from the file, or a large file
                limit = (extra + (1 << 20) - 1) >> 20
                problem = f"corrupt HDF5 file, or metadata needing over {limit:,} MiB: {exc}"
            answer["error"] = {"kind": "FormatError", "problem": problem}
        except Exception as exc:  # a bug here, not a bad file: the parent raises it
            answer["error"] = {"kind": "bug", "problem": f"{type(exc).__name__}: {exc}"}
        work = None  # its objects go before the size is measured
        # Fragmentation must not eat the next request's memory bound: a worker that grew
        # (or ran out of memory) says so in its answer and exits; the parent starts a
        # fresh one next time.
        out_of_memory = answer.get("error", {}).get("kind") == "memory"
        answer["retire"] = out_of_memory or proclimits.vm_size() > start + RETIRE
        send(answer)
        if answer["retire"]:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
