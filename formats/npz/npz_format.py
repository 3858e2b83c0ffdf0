"""NumPy ``.npz``: a zip of ``.npy`` arrays, as ``np.savez`` and ``np.savez_compressed`` write.

Reading never unpickles: an object array (its values are a pickle) is refused, as
``np.load(allow_pickle=False)`` refuses it.  The zip directory and every ``.npy``
header are parsed by nnconv (:mod:`.npzio`), bounded by the file.  A stored member
becomes a byte span into the file (memory-mapped, zero copy); a deflated one is
inflated when its tensor is loaded, never past the size its entry declares, which
may not exceed 1032 times its compressed bytes (deflate's limit).  Fortran-order
arrays load as transposed views; big-endian arrays are byte-swapped on load.  A
plain numpy file reads as its numpy dtypes, named by its keys.

Writing streams one tensor at a time into stored members (``np.load`` reads every
tensor by its name, ``allow_pickle=False``), atomically.  nnconv's records go in
one more member, ``__nnconv__.npy``: a 1-D uint8 array of UTF-8 JSON,
``{"records": {...}, "dtypes": {key: dtype}, "names": {key: name}}``, read with
``json.loads(bytes(np.load(path)["__nnconv__"]))``:

- ``records``: the string map the other formats keep (``nnconv.structure``,
  ``nnconv.aliases``, ``nnconv.version``, the user's metadata); tied weights are
  stored once, their aliases listed there, as in safetensors;
- ``dtypes``: arrays holding bit patterns of a dtype numpy lacks (bfloat16 as
  uint16, float8 as uint8), as HDF5 keeps them;
- ``names``: tensors whose name cannot be a zip member name (``..`` or absolute
  paths, NUL, backslash, the reserved names), stored as ``_nnconv/<i>``.
"""

from __future__ import annotations

import json
import mmap
import os
from functools import partial
from pathlib import Path
from typing import Any

from .. import dtypes, paths, rawio
from ..adapter import Capabilities
from ..atomic import atomic_output
from ..checkpoint import Checkpoint, LazyTensor, Span, check_count, from_records, paused_gc
from ..errors import FormatError, UnsupportedError, UsageError
from ..options import DEFAULT_OPTIONS, WriteOptions
from . import npzio, npzwrite, npzzip

NAME = "npz"
EXTENSIONS = (".npz",)
DESCRIPTION = "NumPy .npz (np.savez, np.savez_compressed); written uncompressed"
CAPABILITIES = Capabilities(writes=True)
FEATURES = "containers, aliases and metadata in a __nnconv__ member; bfloat16/float8 as bits"

META_KEY = "__nnconv__"
ESCAPE = "_nnconv/"
EMPTY_ZIP = b"PK\x05\x06"  # what np.savez writes for no arrays: the end record alone
CRAFTED = npzzip.CRAFTED


def sniff(path: Path, head: bytes) -> bool:
    """A zip whose members are all ``.npy`` arrays (torch's zips hold ``data.pkl``)."""
    if head.startswith(EMPTY_ZIP):
        return len(head) < 64 and path.is_file() and path.stat().st_size < 22 + (1 << 16)
    if not head.startswith(b"PK\x03\x04"):
        return False
    try:
        found = npzzip.members(path)
    except (FormatError, OSError):
        return False
    return bool(found) and all(n.endswith(".npy") for n in found)


# --- reading ---------------------------------------------------------------------------


def _check_names(subject: str, found: dict[str, npzzip.Member]) -> None:
    """Every member a ``.npy`` array under a safe name, stored or deflated."""
    if any(n.endswith("data.pkl") for n in found):
        raise FormatError(
            subject,
            "a torch.save zip archive (it holds data.pkl), not an .npz",
            remedy="read it as pt: --from pt",
        )
    for name, member in found.items():
        if not name.endswith(".npy"):
            raise FormatError(
                subject,
                f"member {name!r} is not a .npy array",
                remedy="an .npz holds only .npy members; " + CRAFTED,
            )
        why = paths.unsafe_name(name)
        if why or "\\" in name:
            raise FormatError(subject, f"member name {name!r} {why or 'has a backslash'}",
                              remedy=CRAFTED)  # fmt: skip
        if member.flags & 1:
            raise UnsupportedError(subject, f"member {name!r} is encrypted")
        if member.method not in (npzzip.STORED, npzzip.DEFLATED) or (
            member.method == npzzip.STORED and not member.stored
        ):
            raise UnsupportedError(
                subject,
                f"member {name!r} uses zip compression method {member.method}",
                remedy="nnconv reads what np.savez and np.savez_compressed write",
            )
        limit = npzio.DEFLATE_MAX_RATIO * member.csize
        if not member.stored and member.size > limit:
            raise FormatError(
                subject,
                f"member {name!r} claims {member.size:,} bytes from {member.csize:,} deflated "
                f"(more than deflate's {npzio.DEFLATE_MAX_RATIO}x)",
                value=member.size,
                limit=limit,
                remedy=CRAFTED,
            )


def _document(subject: str, raw: bytes | bytearray | None, keys: set[str]) -> list[dict[str, str]]:
    """[records, dtypes, names] from nnconv's member (all empty for a plain numpy file)."""
    if raw is None:
        return [{}, {}, {}]

    def bad(problem: str) -> FormatError:
        return FormatError(subject, f"{META_KEY} member: {problem}", remedy=CRAFTED)

    try:
        doc = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not nnconv's JSON record ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    parts = [doc.get(part, {}) for part in ("records", "dtypes", "names")]
    for part, value in zip(("records", "dtypes", "names"), parts, strict=True):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad(f"{part!r} is not a map of strings")
        if part != "records" and not set(value) <= keys:
            raise bad(f"{part!r} names arrays the file does not hold")
    return parts


def _values(raw: Any, array: npzio.Array, dtype: str) -> Any:
    """A tensor of ``dtype`` from the array's stored bytes (swapped when big-endian)."""
    import torch

    dims = array.shape[::-1] if array.fortran else array.shape
    torch_dtype = getattr(torch, dtype)
    if not array.nbytes:
        values = torch.empty(dims, dtype=torch_dtype)
    elif array.big:
        import numpy as np

        code = array.spec.numpy.lstrip("<>|")
        swapped = np.frombuffer(raw, dtype=">" + code).astype("<" + code)
        values = torch.from_numpy(swapped.view(np.uint8)).view(torch_dtype).reshape(dims)
    else:
        values = torch.frombuffer(raw, dtype=torch.uint8).view(torch_dtype).reshape(dims)
    return _transposed(values, array)


def _transposed(values: Any, array: npzio.Array) -> Any:
    """Fortran order: the values were read as the reversed shape; a transposed view."""
    return values.permute(*reversed(range(values.dim()))) if array.fortran else values


def _load(subject: str, mapping: rawio.MappedFile, array: npzio.Array, dtype: str) -> Any:
    """One tensor: a view of the memory map when stored little-endian, else its bytes read
    (inflated within the member's declared size, CRC-checked) and converted."""
    member, at = array.member, array.start + array.skip
    try:
        if member.stored and not array.big:
            dims = array.shape[::-1] if array.fortran else array.shape
            return _transposed(mapping.tensor(dtype, dims, at, array.nbytes), array)
        with open(subject, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            raw: bytes | bytearray
            if member.stored:
                raw = m[at : at + array.nbytes]
                if len(raw) < array.nbytes:
                    raise ValueError("short")
            else:
                raw = npzio.inflate(subject, member.name, m, array.start, member.csize,
                                    member.size, skip=array.skip, crc=member.crc)  # fmt: skip
    except (ValueError, OSError):  # the file shrank or went away since it was read
        problem = f"member {member.name!r} is no longer all in the file"
        remedy = "the file changed while nnconv read it"
        raise FormatError(subject, problem, remedy=remedy) from None
    return _values(raw, array, dtype)


def _arrays(path: Path) -> tuple[dict[str, npzio.Array], bytes | bytearray | None]:
    """Every array's header by key, and nnconv's record (its bytes) when there is one."""
    subject = str(path)
    st = paths.check_input(path, folder_ok=False)
    found = npzzip.members(path)
    check_count(subject, len(found))
    _check_names(subject, found)
    arrays: dict[str, npzio.Array] = {}
    meta: bytes | bytearray | None = None
    if not found:
        return arrays, meta
    with (
        os.fdopen(paths.open_regular(path, st), "rb") as fh,
        mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as heads,
    ):
        for name, member in found.items():
            array = npzio.read_array(subject, heads, member)
            key = name[:-4]
            if key != META_KEY:
                arrays[key] = array
                continue
            if array.spec.name != "uint8" or len(array.shape) != 1 or array.fortran:
                raise FormatError(subject, f"{META_KEY} member is not a 1-D uint8 array")
            if member.stored:
                meta = heads[array.start + array.skip : array.start + member.size]
            else:
                meta = npzio.inflate(subject, name, heads, array.start, member.csize,
                                     member.size, skip=array.skip, crc=member.crc)  # fmt: skip
    return arrays, meta


@paused_gc()
def read(path: Path, *, trust_code: bool = False) -> Checkpoint:
    path = Path(path)
    subject = str(path)
    arrays, meta = _arrays(path)
    records, kinds, names = _document(subject, meta, set(arrays))
    ckpt = Checkpoint(tensors={}, structure=None, format=NAME, source=subject)
    mapping = rawio.MappedFile(path)  # tensors alive keep it open; it closes with the last
    for key, array in arrays.items():
        name, spec = names.get(key, key), array.spec
        if key in kinds:
            spec = dtypes.DTYPES.get(kinds[key])  # type: ignore[assignment]
            if spec is None or not spec.bit_pattern or spec.numpy != array.spec.numpy:
                raise FormatError(
                    subject,
                    f"nnconv records dtype {kinds[key]!r} for array {key!r}, stored as "
                    f"{array.spec.name}",
                    remedy=CRAFTED,
                )
        if name in ckpt.tensors:
            raise FormatError(subject, f"two arrays are named {name!r}", remedy=CRAFTED)
        span = None
        if array.member.stored and not array.big and _c_order(array):
            span = Span(subject, array.start + array.skip, array.nbytes)
        load = partial(_load, subject, mapping, array, spec.name)
        ckpt.tensors[name] = LazyTensor(spec.name, array.shape, load, span=span)
    ckpt.structure, ckpt.aliases, ckpt.metadata = from_records(subject, records, list(ckpt.tensors))
    return ckpt


def _c_order(array: npzio.Array) -> bool:
    """Whether the values lie in C order (Fortran order is the same with one dimension > 1)."""
    return not array.fortran or sum(n > 1 for n in array.shape) <= 1


# --- writing ---------------------------------------------------------------------------


def _key(name: str) -> str | None:
    """The array key (member name less ``.npy``) a tensor name can have, or None."""
    if name == META_KEY or name.startswith(ESCAPE) or "\\" in name:
        return None
    member = name + ".npy"
    if paths.unsafe_name(member) is not None:
        return None
    try:
        size = len(member.encode())
    except UnicodeEncodeError:  # a lone surrogate
        return None
    return name if size <= 0xFFFF else None


@paused_gc()
def write(ckpt: Checkpoint, path: Path, *, options: WriteOptions = DEFAULT_OPTIONS) -> None:
    if options.shard_size or options.compression:
        raise UsageError(
            path, "--shard-size and --compression do not apply to npz files (written stored)"
        )
    items: list[tuple[str, bytes, Any, str]] = []
    kinds, renamed = {}, {}
    for i, (name, lazy) in enumerate(ckpt.tensors.items()):
        spec = dtypes.DTYPES[lazy.dtype]
        if len(lazy.shape) > npzio.MAX_DIMS:
            raise UnsupportedError(
                path, f"tensor {name!r} has {len(lazy.shape)} dimensions; numpy allows 64"
            )
        key = _key(name) or f"{ESCAPE}{i}"
        if key != name:
            renamed[key] = name
        if spec.bit_pattern:
            kinds[key] = spec.name
        head = npzwrite.npy_header(npzwrite.descr(spec), lazy.shape)
        items.append((key + ".npy", head, lazy, name))
    doc = {"records": ckpt.records(), "dtypes": kinds, "names": renamed}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    items.append((META_KEY + ".npy", npzwrite.npy_header("|u1", (len(raw),)), raw, META_KEY))
    with (
        atomic_output(Path(path), force=options.force, fsync=options.fsync) as tmp,
        rawio.SpanReader() as reader,
    ):
        npzwrite.write_zip(tmp, items, reader, options.progress)
