"""TorchScript archives (``torch.jit.save``) read as their module's state_dict, without torch.

``torch.jit.load`` compiles the archive's ``code/`` and runs it (``__setstate__``,
methods), so a crafted archive runs code on a plain ``inspect``.  Here nothing in
the archive runs: ``data.pkl`` is unpickled by :mod:`torchpickle`'s restricted
unpickler, each ``__torch__`` class becoming a placeholder that only records its
attributes, and the class source is read as *text* for its ``__parameters__`` and
``__buffers__`` declarations.  Tensors are byte references checked by
``torchzip.lazy_tensor``.  What this does not model (a class with its own
``__getstate__``/``__setstate__``, a class without source, quantized tensors...)
is refused: only ``trust_code`` hands such a file to ``torch.jit.load``.
"""

from __future__ import annotations

import io
import mmap
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from .. import pickle_gate, rawio, torchpickle, torchzip, trust
from ..checkpoint import MAX_DEPTH, Checkpoint, depth_error, paused_gc
from ..errors import FormatError, NnconvError, UntrustedCodeError
from ..objects import Describer, from_object
from . import pt_format

MAX_RECORD = 64 << 20  # a code/ file or data.pkl; torch writes far smaller ones

# The class source torch prints (python_print.cpp): a header, then two-space indented
# members, declarations on one line each as ``__parameters__ = ["a", "b", ]``.
_CLASS = re.compile(r"^class (\w+)(?:\((\w*)\))?:[ \t]*$", re.M)
_TOP_LEVEL = re.compile(r"^\S", re.M)
_DECLARED = re.compile(r'^  (__parameters__|__buffers__) = \[((?:"[^"\\\n]*", )*)\][ \t]*$', re.M)
_ANY_DECLARED = re.compile(r"^  (__parameters__|__buffers__) ", re.M)
_STATE_HOOK = re.compile(r"^  def (__getstate__|__setstate__)\b", re.M)
_NAME = re.compile(r'"([^"]*)", ')
_MODULE = re.compile(r"__torch__(?:\.\w+)*")
_KINDS = ("__parameters__", "__buffers__")



class Refused(Exception):
    """Something this reader does not model: the archive needs ``torch.jit.load``."""


class ClassInfo(NamedTuple):
    name: str  # __torch__.qualified.Name
    module: bool  # an nn.Module (its parameters, buffers and submodules are the state_dict)
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]


class ScriptObject:
    """A ``__torch__`` object: its class (set on the subclass made per class) and the
    attributes BUILD gave it.  Never anything else: no method of the archive runs."""

    __slots__ = ("state",)
    info: ClassInfo

    def __new__(cls, *args: Any) -> ScriptObject:
        if args:
            raise Refused(f"{cls.info.name} constructed with arguments")
        obj = object.__new__(cls)
        obj.state = None
        return obj

    def __setstate__(self, state: Any) -> None:  # what pickle's BUILD calls
        if self.state is not None:
            raise Refused(f"{self.info.name} built twice")
        self.state = state


def _list(items: list) -> list:
    if type(items) is not list:
        raise Refused("a typed list that is not a list")
    return items


# Globals the TorchScript pickler adds for typed attributes (never state_dict entries).
JIT_FUNCTIONS: dict[tuple[str, str], Callable] = {
    ("torch.jit._pickle", "build_intlist"): _list,
    ("torch.jit._pickle", "build_doublelist"): _list,
    ("torch.jit._pickle", "build_boollist"): _list,
    ("torch.jit._pickle", "build_tensorlist"): _list,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, _tag: value,
    ("torch", "device"): lambda *args: ("device", args),
}


class _Unpickler(torchpickle._Unpickler):
    """torchpickle's unpickler plus ``__torch__`` classes (placeholders) and typed lists."""

    def __init__(self, data: bytes, classes: Callable[[str, str], ClassInfo]) -> None:
        super().__init__(io.BytesIO(data))
        self._classes = classes
        self._made: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in JIT_FUNCTIONS:
            return JIT_FUNCTIONS[module, name]
        if not module.startswith("__torch__"):
            return super().find_class(module, name)
        if (module, name) not in self._made:
            info = self._classes(module, name)
            made = type("ScriptObject", (ScriptObject,), {"__slots__": (), "info": info})
            self._made[module, name] = made
        return self._made[module, name]


class _Archive:
    """The archive's members as bytes (:func:`torchzip.member_bytes`: bounded, inside the
    file, deflated ``code/`` records inflated)."""

    def __init__(self, path: str, members: dict[str, torchzip.Record], heads: mmap.mmap) -> None:
        self.path, self.members, self.heads = path, members, heads
        pickles = [n for n in self.members if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise FormatError(path, f"TorchScript archive holds {len(pickles)} data.pkl records")
        self.prefix = pickles[0][: -len("data.pkl")]
        self._files: dict[str, dict[str, ClassInfo]] = {}

    def member(self, name: str) -> bytes:
        record = self.members.get(self.prefix + name)
        if record is None:
            raise FormatError(self.path, f"TorchScript archive has no {name!r} record")
        # torch.jit.save deflates code/; a record may not claim more than deflate can give
        limit = min(MAX_RECORD, pt_format.DEFLATE_MAX_RATIO * record.csize)
        return torchzip.member_bytes(self.path, self.heads, record, limit=limit)

    def classes(self, module: str, name: str) -> ClassInfo:
        """A ``__torch__`` class from its source in ``code/``, parsed as text."""
        if not _MODULE.fullmatch(module):
            raise Refused(f"global {module}.{name}")
        if module not in self._files:
            source = "code/" + module.replace(".", "/") + ".py"
            if self.prefix + source not in self.members:
                raise Refused(f"{module}.{name} has no TorchScript source (a C++ class?)")
            try:
                text = self.member(source).decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(self.path, f"{source} is not UTF-8 text") from None
            self._files[module] = _parse(self.path, module, text)
        info = self._files[module].get(name)
        if info is None:
            raise Refused(f"{module}.{name} is not defined in the archive's code")
        return info


def _parse(path: str, module: str, text: str) -> dict[str, ClassInfo]:
    """The classes of one code file: which are modules, their declared parameters and
    buffers.  A class with its own ``__getstate__``/``__setstate__`` is refused: torch
    would run it to rebuild the object, and its pickled state is whatever it returns."""
    out: dict[str, ClassInfo] = {}
    for match in _CLASS.finditer(text):
        end = _TOP_LEVEL.search(text, match.end() + 1)
        body = text[match.end() : end.start() if end else len(text)]
        qualname = f"{module}.{match[1]}"
        hook = _STATE_HOOK.search(body)
        if hook:
            raise Refused(f"{qualname} defines {hook[1]}")
        declared = {kind: names for kind, names in _DECLARED.findall(body)}
        if len(declared) != len(_ANY_DECLARED.findall(body)):
            raise FormatError(path, f"{qualname}: unreadable __parameters__/__buffers__")
        params, buffers = (tuple(_NAME.findall(declared.get(k, ""))) for k in _KINDS)
        out[match[1]] = ClassInfo(qualname, match[2] == "Module", params, buffers)
    return out


def _state_dict(path: str, root: Any) -> list[tuple[str, torchpickle.TensorRef]]:
    """(name, tensor) as ``module.state_dict()`` orders them: each module's parameters,
    then its buffers (attribute order), then its submodules', depth first."""
    out: list[tuple[str, torchpickle.TensorRef]] = []
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    while stack:
        obj, prefix, depth = stack.pop()
        info = obj.info if isinstance(obj, ScriptObject) else None
        if info is None or not info.module:
            raise Refused(f"{prefix or 'the archive'} holds no TorchScript module")
        if depth > MAX_DEPTH:
            raise depth_error(path, FormatError, "TorchScript modules: ")
        if id(obj) in seen:
            raise Refused(f"module {prefix.rstrip('.')} appears twice (shared or cyclic)")
        seen.add(id(obj))
        state = obj.state
        if type(state) is not dict or not all(type(k) is str for k in state):
            raise Refused(f"{info.name} has no attribute dict")
        declared = set(info.parameters) | set(info.buffers)
        if len(declared) != len(info.parameters) + len(info.buffers) or declared - set(state):
            raise FormatError(path, f"{info.name}: parameters and buffers do not match its data")
        for names in (set(info.parameters), set(info.buffers)):
            for key, value in state.items():
                if key not in names or value is None:
                    continue
                if type(value) is not torchpickle.TensorRef:
                    raise Refused(f"{prefix}{key} is a {type(value).__name__}, not a tensor")
                out.append((prefix + key, value))
        children = [
            (value, f"{prefix}{key}.", depth + 1)
            for key, value in state.items()
            if key not in declared and isinstance(value, ScriptObject) and value.info.module
        ]
        stack.extend(reversed(children))
    return out


@paused_gc()
def _read(path: str) -> Checkpoint:
    members = torchzip.members(Path(path))  # a FormatError for anything but a zip
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as heads:
        archive = _Archive(path, members, heads)
        order = archive.prefix + "byteorder"
        if order in members and archive.member("byteorder") != b"little":
            raise Refused("big-endian tensors")
        data = archive.member("data.pkl")
        try:
            torchpickle.check_sizes(data)
            root = _Unpickler(data, archive.classes).load()
        except (Refused, NnconvError):
            raise
        except torchpickle.Oversized as exc:
            raise FormatError(path, f"corrupt TorchScript data.pkl: {exc}") from None
        except torchpickle.NotPlain as exc:
            raise Refused(str(exc)) from None
        except Exception as exc:  # a malformed pickle
            raise FormatError(path, f"corrupt TorchScript data.pkl: {exc!r}"[:300]) from None
        entries = _state_dict(path, root)
        if len({name for name, _ in entries}) != len(entries):
            raise FormatError(path, "TorchScript archive names a tensor twice")
        mapping, data_prefix = rawio.MappedFile(Path(path)), archive.prefix + "data/"

        def tensor_leaf(ref: Any, name: str) -> dict | None:
            if type(ref) is not torchpickle.TensorRef:
                return None
            record = archive.members.get(data_prefix + ref.storage.key)
            lazy, key = torchzip.lazy_tensor(path, heads, record, ref, mapping)
            return describer.add(name, lazy, key)

        describer = Describer(path, tensor_leaf)
        try:
            return describer.checkpoint(OrderedDict(entries))
        except torchpickle.NotPlain as exc:
            raise Refused(str(exc)) from None


def read(path: Path, *, trust_code: bool = False) -> Checkpoint:
    """The archive's ``state_dict()``; ``torch.jit.load`` only with ``trust_code`` and
    only for what the restricted reader refuses."""
    try:
        ckpt = _read(str(path))
    except Refused as exc:
        if not trust_code:
            raise _refuse(path, exc) from None
        ckpt = _load_trusted(Path(path))
    except OSError as exc:
        raise FormatError(path, f"cannot read TorchScript archive: {exc}") from None
    ckpt.format, ckpt.source = pt_format.NAME, str(path)
    return ckpt


def _refuse(path: Path, why: Refused) -> UntrustedCodeError:
    return trust.refuse(
        path,
        f"this TorchScript archive needs {trust.FLAG} to be loaded (by torch.jit.load, which "
        f"runs its code): {why}",
    )


def _load_trusted(path: Path) -> Checkpoint:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise FormatError(path, f"torch.jit.load failed: {str(exc).strip()[:200]}") from None
    return from_object(module.state_dict(), subject=str(path))


def globals_in(path: Path) -> list[str]:
    """The globals ``data.pkl`` references (opcode walk, nothing unpickled)."""
    members = torchzip.members(Path(path))
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as heads:
        data = _Archive(str(path), members, heads).member("data.pkl")
    return pickle_gate.scan_bytes(str(path), data)
