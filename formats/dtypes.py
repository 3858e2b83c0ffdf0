"""The dtypes nnconv moves, named as torch names them (without ``torch.``).

One table, torch-free, says for each dtype its size, its safetensors and ONNX codes
and how HDF5 stores it: natively, or as raw bit patterns in an unsigned integer
dataset with a ``dtype`` attribute (the convention Keras 3 uses for bfloat16;
HDF5 has no bfloat16 or float8 type).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedError


@dataclass(frozen=True)
class DType:
    name: str  # torch's name: "float32", "bfloat16", "float8_e4m3fn"
    itemsize: int
    floating: bool
    safetensors: str | None  # safetensors header code, None when it has none
    numpy: str  # numpy dtype HDF5 stores; bit-pattern types use an unsigned int
    bit_pattern: bool = False  # True when ``numpy`` only carries the bits
    storage: str | None = None  # torch's legacy typed-storage class in torch.save pickles
    onnx: int | None = None  # onnx.TensorProto.DataType (fixed by the spec)


_TABLE = [
    DType("float64", 8, True, "F64", "<f8", storage="DoubleStorage", onnx=11),
    DType("float32", 4, True, "F32", "<f4", storage="FloatStorage", onnx=1),
    DType("float16", 2, True, "F16", "<f2", storage="HalfStorage", onnx=10),
    DType("bfloat16", 2, True, "BF16", "<u2", bit_pattern=True, storage="BFloat16Storage", onnx=16),
    DType("float8_e4m3fn", 1, True, "F8_E4M3", "u1", bit_pattern=True, onnx=17),
    DType("float8_e5m2", 1, True, "F8_E5M2", "u1", bit_pattern=True, onnx=19),
    DType("float8_e4m3fnuz", 1, True, None, "u1", bit_pattern=True, onnx=18),
    DType("float8_e5m2fnuz", 1, True, None, "u1", bit_pattern=True, onnx=20),
    DType("float8_e8m0fnu", 1, True, "F8_E8M0", "u1", bit_pattern=True, onnx=24),
    DType("complex64", 8, False, "C64", "<c8", storage="ComplexFloatStorage", onnx=14),
    DType("complex128", 16, False, None, "<c16", storage="ComplexDoubleStorage", onnx=15),
    DType("int64", 8, False, "I64", "<i8", storage="LongStorage", onnx=7),
    DType("int32", 4, False, "I32", "<i4", storage="IntStorage", onnx=6),
    DType("int16", 2, False, "I16", "<i2", storage="ShortStorage", onnx=5),
    DType("int8", 1, False, "I8", "i1", storage="CharStorage", onnx=3),
    DType("uint64", 8, False, "U64", "<u8", onnx=13),
    DType("uint32", 4, False, "U32", "<u4", onnx=12),
    DType("uint16", 2, False, "U16", "<u2", onnx=4),
    DType("uint8", 1, False, "U8", "u1", storage="ByteStorage", onnx=2),
    DType("bool", 1, False, "BOOL", "?", storage="BoolStorage", onnx=9),
]

DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _TABLE if d.safetensors}
# numpy dtype string -> DType, for HDF5 datasets without a ``dtype`` attribute.
BY_NUMPY: dict[str, DType] = {d.numpy: d for d in _TABLE if not d.bit_pattern}
# torch.save names storages by dtype: a legacy class (torch.FloatStorage) where one exists.
BY_STORAGE: dict[str, DType] = {d.storage: d for d in _TABLE if d.storage}
BY_ONNX: dict[int, DType] = {d.onnx: d for d in _TABLE if d.onnx is not None}
CAST_TARGETS = ("float16", "bfloat16", "float32")


def get(name: str, *, subject: str | None = None) -> DType:
    """The table entry for a torch dtype name; a clear error for anything else."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UnsupportedError(
            subject,
            f"dtype {name!r} is not supported",
            value=name,
            remedy=f"supported dtypes: {', '.join(DTYPES)}",
        ) from None


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
