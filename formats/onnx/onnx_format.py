"""ONNX: a model's graph initializers, read as a checkpoint (read-only).

An ONNX file is a protobuf ``ModelProto`` with no magic number; its weights
are the graph's initializers, stored inline (``raw_data`` or typed repeated
fields) or in *external data* files named by a relative ``location``.  That
location is untrusted input (CVE-2024-27318): it must stay inside the model's
folder, symlinks resolved, and its byte range inside the file.  External bytes
are read only when a tensor's ``load()`` asks, exactly the stored range.

Writing needs a graph, so it is the exporter's job, not this adapter's.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import dtypes, paths
from ..adapter import Capabilities
from ..checkpoint import RESERVED_KEYS, Checkpoint, LazyTensor, Span, from_records
from ..errors import FormatError, UnsupportedError, UsageError
from ..options import DEFAULT_OPTIONS, WriteOptions

NAME = "onnx"
EXTENSIONS = (".onnx",)
DESCRIPTION = "ONNX model initializers, inline or external data (written by exporting a model)"
CAPABILITIES = Capabilities(holds=("graph",), runtime="onnxruntime", exported=True)
FEATURES = "graph initializers by name; metadata_props; external data confined to the folder"

# onnx.TensorProto.DataType -> torch dtype name (the codes live in the dtype table).
ONNX_DTYPES: dict[int, str] = {code: d.name for code, d in dtypes.BY_ONNX.items()}
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Where the values of each dtype live when not in raw_data: (field, numbers per element).
_TYPED_FIELD = {"float32": ("float_data", 1), "complex64": ("float_data", 2)}
_TYPED_FIELD.update({"float64": ("double_data", 1), "complex128": ("double_data", 2)})
_TYPED_FIELD.update({"int64": ("int64_data", 1), "uint32": ("uint64_data", 1)})
_TYPED_FIELD["uint64"] = ("uint64_data", 1)

# ModelProto top-level fields: number -> protobuf wire type (0 varint, 2 length-delimited).
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_MAX_IR_VERSION = 30


def varint(data: bytes, pos: int, end: int | None = None) -> tuple[int | None, int]:
    """(value, next position) of a protobuf varint, or (None, pos) when the bytes (up to
    ``end``) run out first or it is longer than 10 bytes."""
    value = shift = 0
    end = len(data) if end is None else end
    while pos < end and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos


def sniff(path: Path, head: bytes) -> bool:
    """``ir_version`` first, then only well-formed ModelProto fields as far as ``head`` goes.

    A field longer than the file is still accepted, so that a truncated model is
    reported as a truncated ONNX file rather than an unknown format.
    """
    if len(head) < 2 or head[0] != 0x08 or not 1 <= head[1] <= _MAX_IR_VERSION:
        return False
    pos, fields = 2, 0
    while pos < len(head):
        tag, after = varint(head, pos)
        if tag is None:
            break
        number, wire = tag >> 3, tag & 7
        if _MODEL_FIELDS.get(number) != wire:
            return False
        value, after = varint(head, after)
        if value is None:
            break
        if wire == 2 and value >= 2**31:  # protobuf messages stop at 2 GiB
            return False
        fields += 1
        pos = after + value if wire == 2 else after
    return fields > 0


def load_graph(path: str | os.PathLike[str]):
    """The ``ModelProto`` of ``path`` without its external data; decode errors as FormatError."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise FormatError(path, "no such file") from None
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise FormatError(
            path, f"not a valid ONNX model: {exc}", remedy="the file is truncated or corrupt"
        ) from None
    if model.ir_version < 1 or not model.HasField("graph"):
        raise FormatError(path, "not a valid ONNX model: no IR version or no graph")
    return model


def read(path: Path, *, trust_code: bool = False) -> Checkpoint:
    path = Path(path)
    return from_graph(load_graph(path), subject=path, folder=path.parent)


def from_graph(model, *, subject: str | os.PathLike[str] | None, folder: Path | None) -> Checkpoint:
    """A checkpoint of ``model``'s initializers; external data is looked up in ``folder``."""
    graph = model.graph
    if len(graph.sparse_initializer):
        raise UnsupportedError(
            subject,
            f"sparse initializer {graph.sparse_initializer[0].values.name!r}: sparse "
            "initializers are not supported",
        )
    tensors: dict[str, LazyTensor] = {}
    for index, proto in enumerate(graph.initializer):
        name = _text(subject, proto.name, f"initializer #{index}'s name")
        if not name:
            raise FormatError(subject, f"initializer #{index} has no name")
        if name in tensors:
            raise FormatError(subject, f"initializer name {name!r} appears more than once")
        tensors[name] = _lazy(proto, subject, folder)
    records: dict[str, str] = {}
    for prop in model.metadata_props:
        key = _text(subject, prop.key, "a metadata_props key")
        if key in records:
            raise FormatError(subject, f"metadata_props key {key!r} appears more than once")
        records[key] = _text(subject, prop.value, f"metadata_props[{key!r}]")
    where, names = str(subject), list(tensors)
    try:
        structure, aliases, metadata = from_records(where, records, names)
    except FormatError:  # nnconv records describing other names (a renaming export): ignore them
        plain = {k: v for k, v in records.items() if k not in RESERVED_KEYS}
        structure, aliases, metadata = from_records(where, plain, names)
    producer = f"{_lenient(model.producer_name)} {_lenient(model.producer_version)}".strip()
    if producer:
        metadata["onnx.producer"] = producer
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None:
        metadata["onnx.opset"] = str(opset)
    return Checkpoint(
        tensors=tensors,
        structure=structure,
        aliases=aliases,
        metadata=metadata,
        format=NAME,
        source=None if subject is None else str(subject),
    )


def _text(subject, value: str | bytes, what: str) -> str:
    """A protobuf string field: upb hands over proto2 strings that are not UTF-8 as bytes."""
    if isinstance(value, bytes):
        raise FormatError(subject, f"{what} is not valid UTF-8 ({len(value)} bytes)")
    return value


def _lenient(value: str | bytes) -> str:
    """A descriptive string field (producer name): undecodable bytes shown, not refused."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _lazy(proto, subject, folder: Path | None) -> LazyTensor:
    """Check one initializer's encoding now; decode its values on ``load()``."""
    name = proto.name
    dtype = ONNX_DTYPES.get(proto.data_type)
    if dtype is None:
        raise UnsupportedError(
            subject,
            f"initializer {name!r}: ONNX data type {_type_name(proto.data_type)} is not supported",
            value=proto.data_type,
        )
    if proto.HasField("segment"):
        raise UnsupportedError(subject, f"initializer {name!r} is segmented (not supported)")
    shape = tuple(proto.dims)
    if any(d < 0 for d in shape):
        raise FormatError(subject, f"initializer {name!r}: invalid dims {list(shape)}")
    nbytes = dtypes.numel(shape) * dtypes.DTYPES[dtype].itemsize
    if proto.data_location == EXTERNAL:
        what = f"initializer {name!r}: an external_data entry"
        entries = {
            _text(subject, e.key, what): _text(subject, e.value, what) for e in proto.external_data
        }
        # Bad locations are refused at read time; a good one is raw little-endian bytes
        # (ONNX's encoding) that a writer can copy without decoding.
        target, offset, _ = _locate(subject, name, folder, entries, nbytes)
        return LazyTensor(
            dtype,
            shape,
            lambda: _read_external(subject, name, folder, entries, dtype, shape),
            span=Span(str(target), offset, nbytes),
        )
    if proto.HasField("raw_data"):
        if len(proto.raw_data) != nbytes:
            raise FormatError(
                subject,
                f"initializer {name!r}: raw_data has {len(proto.raw_data)} bytes, "
                f"shape {list(shape)} {dtype} needs {nbytes}",
            )
        return LazyTensor(dtype, shape, lambda: _from_bytes(proto.raw_data, dtype, shape))
    field, per = _TYPED_FIELD.get(dtype, ("int32_data", 1))
    count = len(getattr(proto, field))
    if count != dtypes.numel(shape) * per:
        raise FormatError(
            subject,
            f"initializer {name!r}: {field} has {count} values, shape {list(shape)} needs "
            f"{dtypes.numel(shape) * per}",
        )
    return LazyTensor(dtype, shape, lambda: _from_typed(getattr(proto, field), field, dtype, shape))


def _type_name(code: int) -> str:
    try:
        import onnx

        return onnx.TensorProto.DataType.Name(code)
    except (ImportError, ValueError):
        return str(code)


def _from_bytes(raw: bytes, dtype: str, shape: tuple[int, ...]):
    import torch

    torch_dtype = getattr(torch, dtype)
    if not raw:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(torch_dtype).reshape(shape)


def _from_typed(values, field: str, dtype: str, shape: tuple[int, ...]):
    """Typed repeated fields; int32_data carries small ints as values, floats as bit patterns."""
    import numpy as np
    import torch

    kind = {"float_data": np.float32, "double_data": np.float64, "int64_data": np.int64}
    kind.update({"uint64_data": np.uint64, "int32_data": np.int32})
    array = np.asarray(values, dtype=kind[field])
    if dtype.startswith("complex"):
        array = array.view(np.complex64 if dtype == "complex64" else np.complex128)
    elif dtype == "bool":
        array = array != 0
    elif dtype in ("float16", "bfloat16"):
        array = array.astype(np.uint16)  # the bit pattern (wraps negative int16 spellings)
    elif dtype.startswith("float8"):
        array = array.astype(np.uint8)
    elif field == "int32_data" or dtype == "uint32":
        array = array.astype(dtypes.DTYPES[dtype].numpy)
    torch_dtype = getattr(torch, dtype)
    out = torch.from_numpy(np.ascontiguousarray(array))
    if out.dtype != torch_dtype:
        out = out.view(torch_dtype)
    return out.reshape(shape)


def _locate(subject, name: str, folder: Path | None, entries: dict, nbytes: int):
    """(real path, offset, file identity) of an external tensor, every field checked;
    the location by the containment rule every reader shares (:func:`paths.contained`)."""
    location = entries.get("location", "")
    what = f"initializer {name!r}: external data location"
    remedy = "external data must be a file inside the model's folder"

    def refuse(problem: str) -> FormatError:
        return FormatError(subject, f"{what} {location!r} {problem}", remedy=remedy)

    if not location:
        raise FormatError(subject, f"initializer {name!r}: external data has no location")
    if folder is None:
        raise refuse("cannot be resolved: the model was not read from a file")
    target, stat = paths.contained(folder, location, subject=subject, what=what, remedy=remedy)
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries.get("length", str(nbytes)))
    except ValueError:
        raise refuse("has a non-integer offset or length") from None
    size = stat.st_size
    if offset < 0 or length != nbytes or offset + length > size:
        problem = (
            f"gives {length} bytes where the tensor needs {nbytes}"
            if length != nbytes and length >= 0
            else f"range [{offset}, {offset + length}) lies outside the {size}-byte file"
        )
        raise refuse(problem)
    return target, offset, (stat.st_dev, stat.st_ino)


def _read_external(subject, name: str, folder, entries: dict, dtype: str, shape):
    """Exactly the tensor's byte range, after checking the location again."""
    import torch

    nbytes = dtypes.numel(shape) * dtypes.DTYPES[dtype].itemsize
    target, offset, identity = _locate(subject, name, folder, entries, nbytes)
    torch_dtype = getattr(torch, dtype)
    if nbytes == 0:
        return torch.empty(shape, dtype=torch_dtype)
    out = torch.empty(nbytes, dtype=torch.uint8)
    view, done = memoryview(out.numpy()), 0
    try:
        with open(target, "rb") as fh:
            opened = os.fstat(fh.fileno())
            if (opened.st_dev, opened.st_ino) != identity:  # swapped since it was checked
                raise FormatError(subject, f"initializer {name!r}: {target} changed while opening")
            fh.seek(offset)
            while done < nbytes:
                got = fh.readinto(view[done:])
                if not got:
                    break
                done += got
    except OSError as exc:
        raise FormatError(target, f"cannot read: {exc.strerror or exc}") from None
    if done != nbytes:
        raise FormatError(
            subject, f"initializer {name!r}: external data file {target.name!r} is truncated"
        )
    return out.view(torch_dtype).reshape(shape)


def write(ckpt: Checkpoint, path: Path, *, options: WriteOptions = DEFAULT_OPTIONS) -> None:
    raise UsageError(
        path,
        "cannot write ONNX from weights alone: an ONNX file needs the model's graph",
        remedy="export with --model path.py:Class (or a self-describing source) and --input-shape",
    )
