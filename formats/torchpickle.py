"""The pickle in a torch.save archive, read and written without torch.

Reading: an unpickler that knows only the globals ``torch.save`` uses for a
plain tensor (``_rebuild_tensor_v2``/``_v3``, ``_rebuild_parameter``, storage
and dtype names) and ``OrderedDict``.  It turns tensors into references to
storage records; anything else raises :class:`NotPlain` and the caller falls
back to ``torch.load`` (weights-only, behind the pickle gate, as before).

Writing: protocol-2 opcodes emitted from a checkpoint's structure, the same
calls ``torch.save`` pickles, so that plain ``torch.load(weights_only=True)``
rebuilds the same containers, Parameters and shared storages.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import dtypes
from .checkpoint import SCALARS
from .errors import FormatError


class NotPlain(Exception):
    """The pickle needs torch.load: it uses a global or layout this reader does not model."""


class _Sealed:
    """Fields set once, by the constructor: a pickle's BUILD opcode would otherwise set
    slots directly (``setattr``), bypassing the checks (a negative offset, a storage
    that is an int...)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise NotPlain(f"BUILD on a {type(self).__name__}")


class StorageRef(_Sealed):
    """A storage record's key, its dtype (None: untyped bytes) and its element count."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: str | None, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class TensorRef(_Sealed):
    """A tensor as ``torch.save`` pickles it: a view (offset, shape, stride) of a storage.

    Plain classes, not dataclasses: a checkpoint may hold 10^5 of them."""

    __slots__ = ("storage", "offset", "shape", "stride", "requires_grad", "dtype")

    def __init__(self, storage, offset, shape, stride, requires_grad, dtype) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.requires_grad, self.dtype = requires_grad, dtype


class ParameterRef(_Sealed):
    __slots__ = ("tensor", "requires_grad")

    def __init__(self, tensor: TensorRef, requires_grad: bool) -> None:
        self.tensor, self.requires_grad = tensor, requires_grad


class _Named(_Sealed):  # a storage class (its dtype, or None for UntypedStorage) or a torch dtype
    __slots__ = ("dtype",)

    def __init__(self, dtype: str | None) -> None:
        self.dtype = dtype


def _tensor(storage, offset, size, stride, requires_grad, hooks, dtype) -> TensorRef:
    if (
        hooks
        or type(offset) is not int
        or offset < 0
        or type(size) is not tuple
        or type(stride) is not tuple
        or len(size) != len(stride)
    ):
        raise NotPlain("tensor with hooks, or an unusual offset, size or stride")
    # Sizes and strides are checked against the storage record in pt_format.
    return TensorRef(storage, offset, size, stride, bool(requires_grad), dtype)


def _rebuild_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    if metadata or type(storage) is not StorageRef or storage.dtype is None:
        raise NotPlain("tensor metadata or an untyped storage in _rebuild_tensor_v2")
    return _tensor(storage, offset, size, stride, requires_grad, hooks, storage.dtype)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if metadata or type(dtype) is not _Named or dtype.dtype is None:
        raise NotPlain("tensor metadata or an unknown dtype in _rebuild_tensor_v3")
    if type(storage) is not StorageRef or storage.dtype is not None:
        raise NotPlain("a typed storage in _rebuild_tensor_v3")
    return _tensor(storage, offset, size, stride, requires_grad, hooks, dtype.dtype)


def _rebuild_parameter(data, requires_grad, hooks):
    if hooks or type(data) is not TensorRef:
        raise NotPlain("parameter with hooks")
    return ParameterRef(data, bool(requires_grad))


FUNCTIONS: dict[tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in FUNCTIONS:
            return FUNCTIONS[module, name]
        if module == "torch" and name in dtypes.BY_STORAGE:
            return _Named(dtypes.BY_STORAGE[name].name)
        if module == "torch.storage" and name == "UntypedStorage":
            return _Named(None)
        if module == "torch" and name in dtypes.DTYPES:
            return _Named(name)
        raise NotPlain(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> StorageRef:
        try:
            kind, storage_type, key, _location, numel = pid
        except (TypeError, ValueError):
            raise NotPlain("unusual persistent id") from None
        if kind != "storage" or type(storage_type) is not _Named or type(key) is not str:
            raise NotPlain("unusual persistent id")
        if type(numel) is not int or numel < 0:
            raise NotPlain("unusual storage size")
        return StorageRef(key, storage_type.dtype, numel)


class Oversized(ValueError):
    """An opcode claims more than the pickle holds (see :func:`check_sizes`)."""


def _opcodes() -> tuple[list[int], Callable]:
    """Each opcode's argument size (-1: up to a newline, <= -2: counted, -6/-7: memo puts,
    -9: STOP or unknown), and a regex matching a run of opcodes with fixed-size arguments
    (LONG_BINPUT only below 2^24): C-speed over the bulk of a pickle."""
    step, fixed = [-9] * 256, {0: [], 1: [], 2: [], 4: [], 8: []}
    for op in pickletools.opcodes:
        n, code = 0 if op.arg is None else op.arg.n, op.code.encode("latin-1")
        step[code[0]] = n
        if n in fixed and code not in (b".", b"r"):
            fixed[n].append(re.escape(code))
    step[ord(".")], step[ord("r")], step[ord("p")] = -9, -6, -7
    parts = [b"[" + b"".join(codes) + b"]" + b"." * n for n, codes in fixed.items()]
    run = re.compile(b"(?:" + b"|".join([*parts, b"r...\\x00"]) + b")*", re.S).match
    return step, run


_STEP, _RUN = _opcodes()
_COUNTS = {-2: struct.Struct("<B"), -3: struct.Struct("<i"), -4: struct.Struct("<I")}
_COUNTS[-5] = struct.Struct("<Q")
_U32 = struct.Struct("<I").unpack_from


def check_sizes(data: bytes) -> None:
    """Raise :class:`Oversized` unless every memo index is below the pickle's size and
    every counted argument fits in it: Python's C unpickler fills a memo list twice a
    PUT's index (10 bytes could cost gigabytes) and allocates what a BINBYTES claims,
    before any other check.  One exact pass over the opcodes (pickletools is 6x slower)."""
    pos, end, step, find, run, u32 = 0, len(data), _STEP, data.find, _RUN, _U32
    while True:
        pos = run(data, pos).end()
        if pos >= end:
            return
        op, at = data[pos], pos + 1
        if op == 88 and at + 4 <= end:  # BINUNICODE, between most runs: the short way
            pos = at + 4 + u32(data, at)[0]
            if pos > end:
                raise Oversized(f"opcode at byte {at - 1} claims {pos - at - 4} bytes past its end")
            continue
        n = step[op]
        if n >= 0 or n == -9:  # STOP, an unknown opcode or a cut-off argument: where
            return  # the unpickler stops too
        if n == -6:  # LONG_BINPUT of 2^24 or more
            if at + 4 <= end and u32(data, at)[0] > end:
                raise Oversized(f"memo index at byte {pos} is past the pickle's size")
            pos = at + 4
        elif n in (-1, -7):  # up to a newline; GLOBAL and INST take two lines
            pos = at
            for _ in range(2 if op in (99, 105) else 1):
                pos = find(b"\n", pos) + 1
                if not pos:
                    return
            digits = data[at : pos - 1]
            if n == -7 and (len(digits) > 19 or not digits.isdigit() or int(digits) > end):
                raise Oversized(f"memo index at byte {at - 1} is past the pickle's size")
        else:
            count = _COUNTS[n]
            if at + count.size > end:
                return
            (size,) = count.unpack_from(data, at)
            pos = at + count.size + size
            if size < 0 or pos > end:
                raise Oversized(f"opcode at byte {at - 1} claims {size} bytes past its end")


def load(data: bytes, subject: str | None = None) -> Any:
    """The archive's object with tensors as :class:`TensorRef`/:class:`ParameterRef`;
    a pickle whose opcodes claim more than it holds is a FormatError naming ``subject``."""
    try:
        check_sizes(data)
    except Oversized as exc:
        raise FormatError(subject, f"corrupt pickle: {exc}") from None
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except NotPlain:
        raise
    except Exception as exc:  # a malformed pickle: torch.load will say what is wrong
        raise NotPlain(f"{type(exc).__name__}: {exc}") from None


# --- writing ----------------------------------------------------------------

_OD = b"ccollections\nOrderedDict\n)R"  # OrderedDict(): GLOBAL, EMPTY_TUPLE, REDUCE
_UNTYPED = b"ctorch.storage\nUntypedStorage\n"


class Emitter:
    """Protocol-2 pickle of a checkpoint structure; ``storage_of(name)`` gives a tensor
    leaf's (storage key, dtype, shape) with aliases resolved to their canonical tensor."""

    def __init__(self, storage_of: Callable[[str], tuple[str, str, tuple[int, ...]]]) -> None:
        self.storage_of = storage_of
        self.out = io.BytesIO()

    def dumps(self, structure: Any) -> bytes:
        self.out.write(b"\x80\x02")
        self._node(structure)
        self.out.write(b".")
        return self.out.getvalue()

    def _node(self, node: Any) -> None:
        w = self.out.write
        if isinstance(node, SCALARS):
            self._scalar(node)
        elif "t" in node:
            self._leaf(node)
        elif "l" in node:
            w(b"]")
            self._marked(node["l"], b"e")
        elif "u" in node:
            w(b"(")
            for child in node["u"]:
                self._node(child)
            w(b"t")
        else:
            w(_OD if node.get("o") else b"}")
            if node["d"]:
                w(b"(")
                for key, value in node["d"]:
                    self._scalar(key)
                    self._node(value)
                w(b"u")
            if "m" in node:  # BUILD sets OrderedDict._metadata, as torch.save's state does
                w(b"}(")
                self._scalar("_metadata")
                w(_OD)
                self._plain(node["m"])
                w(b"ub")

    def _marked(self, children: list, op: bytes) -> None:
        if children:
            self.out.write(b"(")
            for child in children:
                self._node(child)
            self.out.write(op)

    def _plain(self, value: Any) -> None:
        """JSON data (an OrderedDict's ``_metadata``): dict items appended to the top."""
        if isinstance(value, dict):
            if value:
                self.out.write(b"(")
                for key, item in value.items():
                    self._scalar(key)
                    if isinstance(item, dict | list):
                        self.out.write(b"}" if isinstance(item, dict) else b"]")
                    self._plain(item)
                self.out.write(b"u")
        elif isinstance(value, list):
            if value:
                self.out.write(b"(")
                for item in value:
                    if isinstance(item, dict | list):
                        self.out.write(b"}" if isinstance(item, dict) else b"]")
                    self._plain(item)
                self.out.write(b"e")
        else:
            self._scalar(value)

    def _scalar(self, value: Any) -> None:
        w = self.out.write
        if value is None:
            w(b"N")
        elif value is True or value is False:
            w(b"\x88" if value else b"\x89")
        elif isinstance(value, int):
            if 0 <= value < 256:
                w(b"K" + bytes([value]))
            elif 0 <= value < 65536:
                w(b"M" + struct.pack("<H", value))
            elif -(2**31) <= value < 2**31:
                w(b"J" + struct.pack("<i", value))
            else:
                encoded = pickle.encode_long(value)
                if len(encoded) > 255:
                    raise ValueError("integer too large for a checkpoint")
                w(b"\x8a" + bytes([len(encoded)]) + encoded)
        elif isinstance(value, float):
            w(b"G" + struct.pack(">d", value))
        else:
            raw = value.encode("utf-8", "surrogatepass")
            w(b"X" + struct.pack("<I", len(raw)) + raw)

    def _ints(self, values: tuple[int, ...]) -> None:
        self.out.write(b"(")
        for v in values:
            self._scalar(v)
        self.out.write(b"t")

    def _leaf(self, leaf: dict) -> None:
        w = self.out.write
        parameter = bool(leaf.get("p"))
        if parameter:
            w(b"ctorch._utils\n_rebuild_parameter\n(")
        key, dtype, shape = self.storage_of(leaf["t"])
        spec = dtypes.DTYPES[dtype]
        numel = dtypes.numel(shape)
        w(b"ctorch._utils\n_rebuild_tensor_v%d\n((" % (2 if spec.storage else 3))
        self._scalar("storage")
        w(b"ctorch\n%s\n" % spec.storage.encode() if spec.storage else _UNTYPED)
        self._scalar(key)
        self._scalar("cpu")
        self._scalar(numel if spec.storage else numel * spec.itemsize)
        w(b"tQK\x00")  # TUPLE, BINPERSID, storage offset 0
        self._ints(shape)
        strides, step = [], 1
        for dim in reversed(shape):
            strides.append(step)
            step *= max(dim, 1)
        self._ints(tuple(reversed(strides)))
        w(b"\x88" if leaf.get("g") and not parameter else b"\x89")
        w(_OD)
        if not spec.storage:
            w(b"ctorch\n%s\n" % dtype.encode())
        w(b"tR")
        if parameter:
            w(b"\x88" if leaf.get("g", 1) else b"\x89")
            w(_OD + b"tR")
