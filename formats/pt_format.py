"""PyTorch ``torch.save`` files: zip archives and the legacy (pre-1.6) format.

Reading is weights-only: the pickle gate lists every global the file
references before anything is unpickled, and ``torch.load(weights_only=True)``
checks again.  Zip archives are memory-mapped, so tensors are read on demand.
"""

from __future__ import annotations

import os
import struct
import warnings
import zipfile
import zlib
from functools import partial
from pathlib import Path

from . import dtypes, pickle_gate, rawio, torchpickle, torchzip
from .atomic import atomic_output
from .checkpoint import Checkpoint, Describer, LazyTensor, Span, from_object, tensor_flags
from .errors import FormatError, NnconvError, UnsupportedError, UsageError
from .options import DEFAULT_OPTIONS, WriteOptions

NAME = "pt"
EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".params", ".pkl")
DESCRIPTION = "PyTorch torch.save (zip archive and legacy format); weights-only reading"
CAN_WRITE = True
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
    if head.startswith(LEGACY_MAGIC):
        return True
    if not head.startswith(ZIP_MAGIC):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("data.pkl") for n in zf.namelist())
    except ZIP_ERRORS:
        return False


def _is_torchscript(names: list[str]) -> bool:
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def is_torchscript(path: Path) -> bool:
    """A ``torch.jit.save`` archive: a zip with ``constants.pkl`` or a ``code/`` folder."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _is_torchscript(zf.namelist())
    except ZIP_ERRORS:
        return False


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
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if _is_torchscript(names):
                raise UnsupportedError(
                    path,
                    "this is a TorchScript archive (torch.jit.save): its weights come from "
                    "the module it holds",
                    remedy="convert it with nnconv convert, which loads it with torch.jit.load",
                )
            pickles = [n for n in names if n.endswith("data.pkl")]
            if len(pickles) != 1:
                raise FormatError(path, f"zip archive holds {len(pickles)} data.pkl records")
            _check_records(path, zf)
            return pickle_gate.scan_bytes(str(path), zf.read(pickles[0]))
    except ZIP_ERRORS as exc:
        raise FormatError(path, f"corrupt or truncated torch zip archive: {exc}") from None


def _check_records(path: Path, zf: zipfile.ZipFile) -> None:
    """Every record must fit in the file: zipfile and torch allocate a record's declared
    size before reading it, so a corrupt size field would allocate gigabytes."""
    size = os.path.getsize(path)
    for info in zf.infolist():
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise FormatError(
                path,
                f"record {info.filename!r} uses zip compression method {info.compress_type}, "
                "which torch cannot read",
            )
        expands = 1 if info.compress_type == zipfile.ZIP_STORED else DEFLATE_MAX_RATIO
        if info.header_offset + info.compress_size > size or (
            info.file_size > expands * info.compress_size
        ):
            raise FormatError(
                path,
                f"record {info.filename!r} claims {info.file_size} bytes stored in "
                f"{info.compress_size} at offset {info.header_offset} of a {size}-byte file",
                remedy="the file is truncated or corrupt",
            )


def read(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    path = Path(path)
    globals_ = globals_in(path)
    if not trust_pickle:
        pickle_gate.check(str(path), globals_)
    plain = _read_plain(path)
    if plain is not None:
        return plain
    import torch  # only once the gate has passed: refusing a file stays cheap

    legacy = not zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # torch's advice would be a second stderr line
            warnings.simplefilter("ignore")
            obj = torch.load(
                path, map_location="cpu", weights_only=not trust_pickle, mmap=not legacy
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


def _read_plain(path: Path) -> Checkpoint | None:
    """A zip archive of plain tensors and containers, read without torch; None when the
    file needs torch.load (legacy format, big-endian, other globals, compressed records)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            pickles = [i.filename for i in infos if i.filename.endswith("data.pkl")]
            prefix = pickles[0][: -len("data.pkl")]
            if (
                zf.NameToInfo.get(prefix + "byteorder")
                and zf.read(prefix + "byteorder") != b"little"
            ):
                return None
            obj = torchpickle.load(zf.read(pickles[0]))
    except torchpickle.NotPlain:
        return None
    except (*ZIP_ERRORS, IndexError):  # zipfile.is_zipfile missed it: torch decides
        return None
    records = torchzip.index(path, infos)
    mapping = rawio.MappedFile(path)

    def tensor_leaf(value, name: str) -> dict | None:
        parameter = isinstance(value, torchpickle.ParameterRef)
        ref = value.tensor if parameter else value
        if not isinstance(ref, torchpickle.TensorRef):
            return None
        lazy, key = _lazy(path, records, prefix, ref, mapping)
        leaf = describer.add(name, lazy, key)
        grad = value.requires_grad if parameter else ref.requires_grad
        return tensor_flags(leaf, parameter=parameter, requires_grad=grad)

    describer = Describer(str(path), tensor_leaf)
    try:
        ckpt = describer.checkpoint(obj)
    except torchpickle.NotPlain:
        return None
    ckpt.format, ckpt.source = NAME, str(path)
    return ckpt


def _lazy(path: Path, records: dict, prefix: str, ref, mapping) -> tuple[LazyTensor, tuple]:
    """A tensor reference as a lazy tensor: a span when its bytes are contiguous."""
    record = records.get(f"{prefix}data/{ref.storage.key}")
    if record is None:
        raise FormatError(path, f"storage {ref.storage.key!r} has no data record")
    if not record.stored:
        raise torchpickle.NotPlain("compressed storage record")
    spec = dtypes.get(ref.dtype, subject=str(path))
    size = ref.storage.numel * (spec.itemsize if ref.storage.dtype else 1)
    if size != record.size:
        raise FormatError(
            path,
            f"storage {ref.storage.key!r} declares {size} bytes, its record holds {record.size}",
        )
    numel = dtypes.numel(ref.shape)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if numel and (last + 1) * spec.itemsize > size:
        raise FormatError(
            path, f"a tensor of shape {list(ref.shape)} reaches past its {size}-byte storage"
        )
    contiguous, step = True, 1
    for n, s in zip(reversed(ref.shape), reversed(ref.stride), strict=True):
        contiguous &= n == 1 or s == step
        step *= n
    start, nbytes = record.offset + ref.offset * spec.itemsize, numel * spec.itemsize
    if contiguous:
        load = partial(mapping.tensor, ref.dtype, ref.shape, start, nbytes)
        lazy = LazyTensor(ref.dtype, ref.shape, load, span=Span(str(path), start, nbytes))
    else:
        view = (ref.stride, ref.offset)
        load = partial(mapping.tensor, ref.dtype, ref.shape, record.offset, size, view=view)
        lazy = LazyTensor(ref.dtype, ref.shape, load)
    stride = tuple(0 if n == 1 else s for n, s in zip(ref.shape, ref.stride, strict=True))
    return lazy, (ref.storage.key, ref.offset, ref.shape, stride, ref.dtype)


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
    done = 0
    with atomic_output(Path(path), force=options.force) as tmp, rawio.SpanReader() as reader:

        def filler(name: str, lazy: LazyTensor):
            def fill(fd: int, offset: int) -> int:
                nonlocal done
                crc = reader.write_at(fd, offset, lazy, name=name, crc=True)
                done += lazy.nbytes
                if options.progress:
                    options.progress(done)
                return crc

            return fill

        storages = [(lazy.nbytes, filler(n, lazy)) for n, lazy in ckpt.tensors.items()]
        torchzip.write(tmp, data, storages)
