"""GGUF: llama.cpp's single-file format, read and written with the ``gguf`` package.

``gguf`` (llama.cpp's gguf-py) is the reference implementation of the container and
of every quantisation type: nnconv takes its type tables, dequantises with
``gguf.quants`` and writes headers with ``gguf.GGUFWriter``.  Headers are parsed by
:mod:`.gguf_header`, which bounds every field (``gguf.GGUFReader`` trusts them, and
spends ~20 µs per tokenizer array item; the tests hold the two to the same fields).
Without the package, GGUF files are still detected by their magic, and reading or
writing one is an error naming ``pip install 'nnconv[gguf]'``.

Reading: F32, F16, BF16, F64 and I8-I64 tensors are views of the file, bit for bit,
shaped as torch shapes them (GGUF lists dimensions fastest-varying first).  Every
other type (Q8_0, Q4_K, IQ2_XS...) is dequantised to float32 when a tensor is loaded,
and ``nnconv.quantization`` in the metadata maps each such tensor to its GGML type,
so a conversion writes dequantised values only when a ``--dtype`` asks for them.  Key/
values become metadata strings (JSON for numbers and arrays); ``nnconv.gguf.types``
keeps their GGUF types so that writing GGUF again restores them.

Writing stores tensors unquantised under the names they have: dtypes GGUF lacks
(bool, unsigned, float8, complex) and shapes it lacks (0-d, more than 4 dimensions)
are stored as the same bytes in an integer or flat tensor, recorded in
``nnconv.gguf.tensors``; nnconv's structure and alias records are key/values.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import dtypes, paths, rawio
from ..adapter import Capabilities
from ..atomic import atomic_output
from ..checkpoint import Checkpoint, LazyTensor, Span, from_records
from ..errors import FormatError, UnsupportedError
from ..keys import QUANT_KEY
from ..options import DEFAULT_OPTIONS, WriteOptions
from . import gguf_header
from .gguf_header import ALIGNMENT_KEY, DEFAULT_ALIGNMENT, PSEUDO_KEYS

NAME = "gguf"
EXTENSIONS = (".gguf",)
DESCRIPTION = "GGUF (llama.cpp); quantised tensors read as float32 (needs nnconv[gguf])"
CAPABILITIES = Capabilities(writes=True)
FEATURES = "flat tensors, quantisation types recorded; containers, aliases, metadata as key/values"

TYPES_KEY = "nnconv.gguf.types"  # {key: GGUF type} of the key/values that are not strings
LAYOUT_KEY = "nnconv.gguf.tensors"  # {tensor: [dtype, shape]} stored as other bytes
INSTALL = "pip install 'nnconv[gguf]'"
# GGML type -> torch dtype, for the types stored as plain little-endian values.
NATIVE = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
}
BY_DTYPE = {dtype: kind for kind, dtype in NATIVE.items()}
BIT_PATTERNS = {1: "I8", 2: "I16", 4: "I32", 8: "I64"}  # other dtypes' bytes, by item size
PACKING = {
    "UINT8": "<B",
    "INT8": "<b",
    "UINT16": "<H",
    "INT16": "<h",
    "UINT32": "<I",
    "INT32": "<i",
    "FLOAT32": "<f",
    "UINT64": "<Q",
    "INT64": "<q",
    "FLOAT64": "<d",
    "BOOL": "<?",
}


def _gguf(subject: Path) -> ModuleType:
    """The ``gguf`` package, or the one-line error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedError(
            subject,
            "GGUF needs the gguf package (llama.cpp's reference implementation)",
            remedy=f"install it: {INSTALL}",
        ) from None
    return gguf


def sniff(path: Path, head: bytes) -> bool:
    return head[:4] == gguf_header.MAGIC


# --- reading ----------------------------------------------------------------


def read(path: Path, *, trust_code: bool = False) -> Checkpoint:
    path = Path(path)
    st = paths.check_input(path, folder_ok=False)
    gguf = _gguf(path)
    sizes = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    try:
        with os.fdopen(paths.open_regular(path, st), "rb") as fh:
            if os.fstat(fh.fileno()).st_size < 24:
                raise FormatError(path, "truncated: too short for a GGUF header")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                header = gguf_header.parse(path, data, sizes)
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None
    metadata, types = {}, {}
    for key, (spec, value) in header.values.items():
        metadata[key] = value if spec == "STRING" else json.dumps(value, ensure_ascii=False)
        if spec != "STRING":
            types[key] = spec
    for key in (QUANT_KEY, TYPES_KEY):  # what this file's types say, not an earlier record
        metadata.pop(key, None)
    layout = _layout(path, metadata.pop(LAYOUT_KEY, None))
    _refuse_split(path, metadata)
    mapping = rawio.MappedFile(path)
    tensors: dict[str, LazyTensor] = {}
    quantized: dict[str, str] = {}
    for t in header.tensors:
        kind = gguf.GGMLQuantizationType(t.ggml_type)
        shape = tuple(reversed(t.dims))  # GGUF lists the fastest-varying dimension first
        if kind.name in NATIVE:
            dtype, shape = layout.pop(t.name, (NATIVE[kind.name], shape))
            if dtypes.numel(shape) * dtypes.DTYPES[dtype].itemsize != t.nbytes:
                raise FormatError(path, f"{LAYOUT_KEY}: tensor {t.name!r} does not fit its bytes")
            load = functools.partial(mapping.tensor, dtype, shape, t.offset, t.nbytes)
            span = Span(str(path), t.offset, t.nbytes)
            tensors[t.name] = LazyTensor(dtype, shape, load, span=span)
        else:
            quantized[t.name] = kind.name
            load = functools.partial(_dequantize, path, mapping, t.name, kind, shape, t.offset)
            tensors[t.name] = LazyTensor("float32", shape, functools.partial(load, t.nbytes))
    if layout:
        raise FormatError(path, f"{LAYOUT_KEY} names {sorted(layout)[:3]}, not plain tensors")
    ckpt = Checkpoint(tensors=tensors, structure=None, format=NAME, source=str(path))
    ckpt.structure, ckpt.aliases, ckpt.metadata = from_records(str(path), metadata, list(tensors))
    if quantized:
        ckpt.metadata[QUANT_KEY] = json.dumps(quantized, separators=(",", ":"))
    if types:
        ckpt.metadata[TYPES_KEY] = json.dumps(types, separators=(",", ":"))
    return ckpt


def _layout(path: Path, text: str | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """nnconv's record of tensors stored as other bytes: {name: (dtype, shape)}."""
    if text is None:
        return {}
    try:
        record = json.loads(text)
        out = {}
        for name, (dtype, shape) in record.items():
            if dtype not in dtypes.DTYPES or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(name)
            out[name] = (dtype, tuple(shape))
        return out
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise FormatError(path, f"{LAYOUT_KEY} metadata is malformed") from None


def _refuse_split(path: Path, metadata: dict[str, str]) -> None:
    count = metadata.get("split.count", "1")
    if count.isdigit() and int(count) > 1:
        raise UnsupportedError(
            path,
            f"one part of a GGUF split into {count} files",
            remedy="merge them first: llama-gguf-split --merge FIRST.gguf OUT.gguf",
        )


def _dequantize(
    path: Path,
    mapping: rawio.MappedFile,
    name: str,
    kind: Any,
    shape: tuple[int, ...],
    offset: int,
    nbytes: int,
) -> Any:
    """A quantised tensor's values as float32, computed by gguf from the file's bytes."""
    import torch
    from gguf import GGML_QUANT_SIZES, quants

    if not nbytes:
        return torch.zeros(shape, dtype=torch.float32)
    block, type_size = GGML_QUANT_SIZES[kind]
    raw = mapping.tensor("uint8", (nbytes,), offset, nbytes).numpy()
    rows = raw.reshape(-1, shape[-1] // block * type_size)
    try:
        values = quants.dequantize(rows, kind)
    except NotImplementedError:
        from importlib.metadata import version

        raise UnsupportedError(
            path,
            f"tensor {name!r}: gguf {version('gguf')} cannot dequantise {kind.name}",
            remedy="a newer gguf may: pip install -U gguf",
        ) from None
    return torch.from_numpy(values.reshape(shape))


# --- writing ----------------------------------------------------------------


def write(ckpt: Checkpoint, path: Path, *, options: WriteOptions = DEFAULT_OPTIONS) -> None:
    path = Path(path)
    if options.compression:
        raise UnsupportedError(path, "GGUF has no compression; --compression is for hdf5")
    if options.shard_size:
        raise UnsupportedError(path, "nnconv writes one GGUF file; --shard-size is for safetensors")
    gguf = _gguf(path)
    plan = [_plan(path, name, lazy) for name, lazy in ckpt.tensors.items()]
    records = ckpt.records()
    types = _types(records.pop(TYPES_KEY, None))
    for key in (QUANT_KEY, LAYOUT_KEY, ALIGNMENT_KEY):
        records.pop(key, None)  # the file's own types and layout say these
    layout = {name: record for name, _, _, _, record in plan if record is not None}
    if layout:
        records[LAYOUT_KEY] = json.dumps(layout, separators=(",", ":"), ensure_ascii=False)
    for key, text in records.items():
        if key in PSEUDO_KEYS:
            raise UnsupportedError(path, f"metadata key {key!r} is reserved by GGUF readers")
        try:
            key.encode("utf-8"), text.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsupportedError(path, f"metadata {key!r} is not valid UTF-8") from None
    with (
        atomic_output(path, force=options.force, fsync=options.fsync) as tmp,
        rawio.SpanReader() as reader,
    ):
        _write_file(gguf, tmp, plan, records, types, reader, options.progress)


Planned = tuple[str, LazyTensor, str, tuple[int, ...], list[Any] | None]


def _plan(path: Path, name: str, lazy: LazyTensor) -> Planned:
    """(name, tensor, GGML type, stored shape, layout record or None) for one tensor."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedError(path, f"tensor {name!r}: its name is not valid UTF-8") from None
    native = BY_DTYPE.get(lazy.dtype)
    if native is not None and 1 <= len(lazy.shape) <= gguf_header.MAX_DIMS:
        return name, lazy, native, lazy.shape, None
    itemsize = dtypes.DTYPES[lazy.dtype].itemsize
    kind = native or BIT_PATTERNS[min(itemsize, 8)]
    stored = (lazy.nbytes // dtypes.DTYPES[NATIVE[kind]].itemsize,)
    return name, lazy, kind, stored, [lazy.dtype, list(lazy.shape)]


def _types(text: str | None) -> dict[str, str]:
    try:
        types = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        return {}
    return {k: v for k, v in types.items() if isinstance(v, str)} if isinstance(types, dict) else {}


def _typed(gguf: ModuleType, text: str, spec: str) -> tuple[Any, Any, Any] | None:
    """(value, GGUF type, item type) restoring a key/value's recorded type; None when the
    text no longer fits it (then it is written as a string)."""
    array = spec.startswith("ARRAY[") and spec.endswith("]")
    kind = spec[6:-1] if array else spec
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    items = value if array and isinstance(value, list) else [value]
    if (array and not (isinstance(value, list) and value)) or not all(
        _fits(v, kind) for v in items
    ):
        return None
    kinds = gguf.GGUFValueType
    return (value, kinds.ARRAY, kinds[kind]) if array else (value, kinds[kind], None)


def _fits(value: Any, kind: str) -> bool:
    if kind == "STRING":
        return isinstance(value, str)
    if kind not in PACKING or isinstance(value, bool) != (kind == "BOOL"):
        return False
    if not isinstance(value, (bool, int, float)) or (isinstance(value, float) and "INT" in kind):
        return False
    try:
        struct.pack(PACKING[kind], value)
    except (struct.error, OverflowError):
        return False
    return True


def _write_file(
    gguf: ModuleType,
    tmp: Path,
    plan: list[Planned],
    records: dict[str, str],
    types: dict[str, str],
    reader: rawio.SpanReader,
    progress: Any,
) -> None:
    """The header by gguf's writer, then each tensor's bytes at its aligned offset."""
    import numpy as np

    writer = gguf.GGUFWriter(None, "")  # an empty architecture adds no key
    try:
        for key, text in records.items():
            typed = _typed(gguf, text, types[key]) if key in types else None
            writer.add_key_value(key, *(typed or (text, gguf.GGUFValueType.STRING, None)))
        for name, lazy, kind, shape, _ in plan:
            stored = np.dtype(dtypes.DTYPES[NATIVE[kind]].numpy)
            raw = gguf.GGMLQuantizationType[kind]
            writer.add_tensor_info(name, shape, stored, lazy.nbytes, raw_dtype=raw)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        end = writer.fout[0].tell()
    finally:
        writer.close()
    start = _pad(end)
    fd = os.open(tmp, os.O_WRONLY)
    try:
        total = sum(_pad(lazy.nbytes) for _, lazy, _, _, _ in plan)
        rawio.preallocate(fd, start + total)
        at = 0
        with rawio.Placer(reader, fd) as placer:
            for name, lazy, _, _, _ in plan:
                placer.tensor(start + at, lazy, name=name)
                at += _pad(lazy.nbytes)
                if progress:
                    progress(at)
        os.ftruncate(fd, start + total)
    finally:
        os.close(fd)


def _pad(n: int) -> int:
    return -(-n // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
