"""PyTorch ``torch.save`` files: zip archives and the legacy (pre-1.6) format.

Reading is weights-only: the pickle gate lists every global the file
references before anything is unpickled, and ``torch.load(weights_only=True)``
checks again.  Zip archives are memory-mapped, so tensors are read on demand.
"""

from __future__ import annotations

import errno
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

from . import pickle_gate
from .atomic import atomic_output
from .checkpoint import Checkpoint, from_object, to_object
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


def write(ckpt: Checkpoint, path: Path, *, options: WriteOptions = DEFAULT_OPTIONS) -> None:
    import torch

    if options.shard_size or options.compression:
        raise UsageError(path, "--shard-size and --compression do not apply to pt files")
    obj = to_object(ckpt)
    # Through a file object, a full disk or a size limit surfaces as the OSError it is.
    with atomic_output(Path(path), force=options.force) as tmp, open(tmp, "wb") as fh:
        try:
            torch.save(obj, fh)
        except RuntimeError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, OSError):
                raise cause from None
            if "unexpected pos" in str(exc):  # the zip writer lost bytes: the write fell short
                raise OSError(errno.EIO, "short write (disk full or file size limit?)") from None
            raise
    if options.progress:
        options.progress(ckpt.nbytes)
