"""PyTorch ``torch.save`` files: zip archives and the legacy (pre-1.6) format.

Reading is weights-only.  A zip archive of tensors and containers is read
without torch (:func:`read_plain`: an unpickler that resolves only torch's
tensor rebuild calls, and byte spans into the archive).  Anything else goes
through the pickle gate, which lists every global the file references before
anything is unpickled, then ``torch.load(weights_only=True)``, memory-mapped.
Writing produces torch.save's zip layout with nnconv's own writer (:mod:`torchzip`).
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
import zipfile
import zlib
from functools import partial
from pathlib import Path

from .. import pickle_gate, rawio, torchpickle, torchzip
from ..adapter import Capabilities, Classified
from ..atomic import atomic_output
from ..checkpoint import (
    Checkpoint,
    paused_gc,
)
from ..errors import FormatError, NnconvError, UnsupportedError, UsageError
from ..objects import Describer, from_object, tensor_flags
from ..options import DEFAULT_OPTIONS, WriteOptions
from . import sharded_bin

NAME = "pt"
EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".params", ".pkl")
DESCRIPTION = "PyTorch torch.save (zip archive and legacy format); weights-only reading"
CAPABILITIES = Capabilities(
    writes=True, holds=("weights", "module", "torchscript"), metadata=False
)
FEATURES = "containers, non-tensor leaves, tied weights; no free-form metadata"

ZIP_MAGIC = b"PK\x03\x04"
# pickle protocol 2 header + the LONG1 magic number torch's legacy format starts with
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
LEGACY_PICKLES = 5  # magic number, protocol version, sys info, the object, storage keys
LINE_LIMIT = 1 << 20  # longest pickle text line (GLOBAL names, INT digits) the gate reads
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this
# What zipfile raises on a corrupt archive besides BadZipFile: unsupported versions and
# methods, undecodable names, bad seeks and struct fields, encrypted or broken deflate data.
ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    zlib.error,
)


def sniff(path: Path, head: bytes) -> bool:
    if sharded_bin.is_index(path):  # a folder of pytorch_model-*.bin shards, by its index
        return True
    if head.startswith(LEGACY_MAGIC):
        return True
    return head.startswith(ZIP_MAGIC) and any(n.endswith("data.pkl") for n in _members(path))


def _members(path: Path) -> dict[str, torchzip.Record]:
    """The zip's members, or none when it is not a readable zip (torch.load will say why)."""
    try:
        return torchzip.members(path)
    except (FormatError, OSError):
        return {}


def _is_torchscript(names) -> bool:
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def is_torchscript(path: Path) -> bool:
    """A ``torch.jit.save`` archive: a zip with ``constants.pkl`` or a ``code/`` folder."""
    return _is_torchscript(_members(path))


class _Bounded:
    """A file whose reads never ask for more than is left in it.

    pickletools reads a whole length field's worth at once (``read(n)``
    preallocates ``n`` bytes), so a corrupt 4-byte length would make a 1 KB
    file allocate 4 GB before the short read is noticed.
    """

    def __init__(self, fh) -> None:
        self.fh = fh
        self.size = os.fstat(fh.fileno()).st_size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.fh.tell())
        return self.fh.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.fh.readline(LINE_LIMIT)

    def tell(self) -> int:
        return self.fh.tell()


def globals_in(path: Path) -> list[str]:
    """Every global the file's pickles reference, found without unpickling."""
    with open(path, "rb") as fh:
        head = fh.read(len(LEGACY_MAGIC))
        fh.seek(0)
        if head[:1] == b"\x80" and not head.startswith(LEGACY_MAGIC):
            raise FormatError(
                path,
                "a plain pickle (pickle.dump), not a torch.save file",
                remedy="re-save it with torch.save",
            )
        if head.startswith(LEGACY_MAGIC):
            found: list[str] = []
            bounded = _Bounded(fh)
            try:
                for _ in range(LEGACY_PICKLES):
                    found += pickle_gate.scan(bounded)
            except (ValueError, EOFError) as exc:  # what pickletools raises on corrupt data
                raise FormatError(path, f"corrupt legacy torch file: {exc}") from None
            return found
    # The members as nnconv's unpickler and torch see them (torchzip: one index parser).
    members = torchzip.members(path)
    names = list(members)
    if _is_torchscript(names):  # data.pkl's globals, read as torchscript.read does
        from . import torchscript

        return torchscript.globals_in(path)
    pickles = [n for n in names if n.endswith("data.pkl")]
    if len(pickles) != 1:
        raise FormatError(path, f"zip archive holds {len(pickles)} data.pkl records")
    _check_records(path, members)
    return pickle_gate.scan_bytes(str(path), _member_bytes(path, members, pickles[0]))


def _member_bytes(path: Path, members: dict[str, torchzip.Record], name: str) -> bytes:
    """One member's bytes, inflated when deflated (sizes bounded by _check_records), once
    every local header is checked against the central directory."""
    record = members[name]
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as heads:
            torchzip.check_local_names(str(path), heads, members)
            return torchzip.member_bytes(str(path), heads, record, limit=record.size)
    except (OSError, ValueError) as exc:
        raise FormatError(path, f"corrupt or truncated torch zip archive: {exc}") from None


def _check_records(path: Path, members: dict[str, torchzip.Record]) -> None:
    """Every record must fit in the file: torch allocates a record's declared size before
    reading it, so a corrupt size field would allocate gigabytes.  Storage records must
    be stored: torch.load(mmap=True) maps their bytes as they lie, deflated or not."""
    size = os.path.getsize(path)
    for record in members.values():
        if record.method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise FormatError(
                path,
                f"record {record.name!r} uses zip compression method {record.method}, "
                "which torch cannot read",
            )
        expands = 1 if record.method == zipfile.ZIP_STORED else DEFLATE_MAX_RATIO
        if record.header + record.csize > size or record.size > expands * record.csize:
            raise FormatError(
                path,
                f"record {record.name!r} claims {record.size} bytes stored in "
                f"{record.csize} at offset {record.header} of a {size}-byte file",
                remedy="the file is truncated or corrupt",
            )
        if not record.stored and "/data/" in record.name:
            raise FormatError(
                path,
                f"storage record {record.name!r} is compressed: torch.load (memory-mapped) "
                "would read its compressed bytes as the tensor's values",
                remedy="re-save it with torch.save",
            )


def classify(path: Path) -> Classified:
    """What the file holds, each fact found once: a TorchScript archive, plain tensors
    (read here, without torch), or pickles the gate scanned (a whole module or weights
    that need ``torch.load``); the reader reuses the scan."""
    path = Path(path)
    if sharded_bin.is_index(path) or path.is_dir():  # pytorch_model-*.bin shards
        return Classified("weights", reader=partial(_sharded, path))
    members = _members(path)
    if _is_torchscript(members):  # never torch.jit.load, which runs the archive's code
        return Classified("torchscript", reader=partial(_script, path))
    plain = read_plain(path, members)  # its unpickler resolves only tensor rebuilds
    if plain is not None:
        return Classified("weights", checkpoint=plain)
    globals_ = tuple(globals_in(path))
    kind = "module" if pickle_gate.is_module_pickle(globals_) else "weights"
    return Classified(kind, pickle_globals=globals_, reader=partial(_gated, path, globals_))


def describe(path: Path, found: Classified) -> dict[str, list[str]]:
    """For ``inspect``: the globals the file's pickles name (none for TorchScript)."""
    if found.kind == "torchscript":
        return {}
    if sharded_bin.is_index(path) or path.is_dir():  # every shard's, together
        files = sharded_bin.shards(path)[2].values()
        return {"globals": sorted({g for f in files for g in globals_in(f)})}
    return {"globals": sorted(set(found.pickle_globals or globals_in(path)))}


def read(path: Path, *, trust_code: bool = False) -> Checkpoint:
    found = classify(path)
    return found.checkpoint or found.reader(trust_code)


def _sharded(path: Path, trust_code: bool) -> Checkpoint:
    return sharded_bin.read(path, trust_code=trust_code)


def _script(path: Path, trust_code: bool) -> Checkpoint:
    from . import torchscript

    return torchscript.read(path, trust_code=trust_code)


def _gated(path: Path, globals_: tuple[str, ...], trust_code: bool) -> Checkpoint:
    """``torch.load`` once the gate passed the globals ``classify`` scanned."""
    if not trust_code:
        pickle_gate.check(str(path), list(globals_))
    import torch  # only once the gate has passed: refusing a file stays cheap

    legacy = not zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # torch's advice would be a second stderr line
            warnings.simplefilter("ignore")
            obj = torch.load(
                path, map_location="cpu", weights_only=not trust_code, mmap=not legacy
            )
    except NnconvError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(path, f"torch.load failed: {first}") from None
    if isinstance(obj, torch.nn.Module):
        raise UnsupportedError(
            path,
            f"holds a whole module ({type(obj).__qualname__}), not a state_dict",
            remedy="save model.state_dict() instead",
        )
    ckpt = from_object(obj, subject=str(path))
    ckpt.format, ckpt.source = NAME, str(path)
    return ckpt


@paused_gc()
def read_plain(
    path: Path, members: dict[str, torchzip.Record] | None = None
) -> Checkpoint | None:
    """A zip archive of tensors and containers, read without torch.

    Its unpickler resolves nothing but ``OrderedDict`` and torch's tensor rebuild
    calls (turned into byte references), so it runs before the pickle gate.
    None when the file needs ``torch.load``: the legacy format, other globals (a
    whole module, numpy arrays...), big-endian or compressed records.
    """
    members = _members(Path(path)) if members is None else members
    pickles = [n for n in members if n.endswith("data.pkl")]
    if len(pickles) != 1 or not members[pickles[0]].stored or _is_torchscript(members):
        return None
    prefix = pickles[0][: -len("data.pkl")]
    data_prefix, path_str = prefix + "data/", str(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as heads:

        def member(record: torchzip.Record) -> bytes:
            if not record.stored:
                raise torchpickle.NotPlain("compressed record")
            start = torchzip.data_offset(path_str, heads, record)
            return heads[start : start + record.size]

        order = members.get(prefix + "byteorder")
        try:
            if order is not None and member(order) != b"little":
                return None
            obj = torchpickle.load(member(members[pickles[0]]), path_str)
        except torchpickle.NotPlain:
            return None
        mapping = rawio.MappedFile(path)

        def tensor_leaf(value, name: str) -> dict | None:
            parameter = type(value) is torchpickle.ParameterRef
            ref = value.tensor if parameter else value
            if type(ref) is not torchpickle.TensorRef:
                return None
            record = members.get(data_prefix + ref.storage.key)
            lazy, key = torchzip.lazy_tensor(path_str, heads, record, ref, mapping)
            leaf = describer.add(name, lazy, key)
            if parameter or ref.requires_grad:
                grad = value.requires_grad if parameter else ref.requires_grad
                tensor_flags(leaf, parameter=parameter, requires_grad=grad)
            return leaf

        describer = Describer(path_str, tensor_leaf)
        try:
            ckpt = describer.checkpoint(obj)
        except torchpickle.NotPlain:
            return None
    ckpt.format, ckpt.source = NAME, path_str
    return ckpt


@paused_gc()
def write(ckpt: Checkpoint, path: Path, *, options: WriteOptions = DEFAULT_OPTIONS) -> None:
    """A torch.save zip archive written by nnconv itself, tensor bytes copied one at a time
    (see :mod:`torchzip`); plain ``torch.load`` reads it."""
    if options.shard_size or options.compression:
        raise UsageError(path, "--shard-size and --compression do not apply to pt files")
    keys = {name: str(i) for i, name in enumerate(ckpt.tensors)}

    def storage_of(name: str) -> tuple[str, str, tuple[int, ...]]:
        canonical = ckpt.aliases.get(name, name)
        lazy = ckpt.tensors[canonical]
        return keys[canonical], lazy.dtype, lazy.shape

    data = torchpickle.Emitter(storage_of).dumps(ckpt.structure)
    storages = [(lazy, name) for name, lazy in ckpt.tensors.items()]
    with (
        atomic_output(Path(path), force=options.force, fsync=options.fsync) as tmp,
        rawio.SpanReader() as reader,
    ):
        torchzip.write(tmp, data, storages, reader, options.progress)
