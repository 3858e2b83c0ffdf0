"""The pickle gate: list every global a pickle references, without running it.

``pickletools.genops`` walks the opcodes; nothing is unpickled.  Every
GLOBAL / STACK_GLOBAL / INST target must be in :data:`ALLOWED`, the one
allowlist nnconv keeps; opcodes whose target cannot be known statically
(STACK_GLOBAL fed by computed values, the copyreg extension registry) are
refused as unknown.  ``torch.load(weights_only=True)`` runs after the gate as a
second line of defence.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
from typing import IO

from .errors import FormatError, LazyParameterError, UnsafePickleError

_DTYPES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "complex128",
    "complex64",
    "complex32",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
]
_STORAGES = [
    "Double",
    "Float",
    "Half",
    "BFloat16",
    "Long",
    "Int",
    "Short",
    "Char",
    "Byte",
    "Bool",
    "ComplexDouble",
    "ComplexFloat",
]

ALLOWED: frozenset[str] = frozenset(
    # Containers a state_dict or training checkpoint is made of.
    ["collections.OrderedDict"]
    # Tensor and parameter rebuilders torch.save emits for dense tensors.
    + [
        f"torch._utils.{f}"
        for f in (
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
        )
    ]
    # Storage classes named in persistent ids (CPU and CUDA, legacy and zip).
    + [f"torch.{s}Storage" for s in _STORAGES]
    + [f"torch.cuda.{s}Storage" for s in _STORAGES]
    + ["torch.storage.UntypedStorage", "torch.storage.TypedStorage"]
    # dtype objects (torch._utils._rebuild_tensor_v3 takes the dtype).
    + [f"torch.{d}" for d in _DTYPES]
    # Plain values torch puts next to tensors.
    + ["torch.Size", "torch.device"]
)

LAZY_GLOBALS = frozenset(
    {"torch.nn.parameter.UninitializedParameter", "torch.nn.parameter.UninitializedBuffer"}
)
_UNKNOWN = "<computed global>"
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def scan(stream: IO[bytes]) -> list[str]:
    """Globals referenced by the one pickle at the stream's position, in order of use.

    Reads up to and including the pickle's STOP opcode.  Raises ``ValueError``
    for a malformed pickle.
    """
    found: list[str] = []
    memo: dict[int, object] = {}
    recent: list[object] = []  # values of the last opcodes, enough for STACK_GLOBAL
    proto = 0
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.append(_python3_name(*str(arg).split(" ", 1), proto))
            recent.append(None)
        elif name == "STACK_GLOBAL":
            mod, qual = recent[-2:] if len(recent) >= 2 else [None, None]
            ok = isinstance(mod, str) and isinstance(qual, str)
            found.append(_python3_name(mod, qual, proto) if ok else _UNKNOWN)
            recent.append(None)
        elif name == "PROTO":
            proto = arg
            continue
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.append(f"<copyreg extension {arg}>")
        elif name in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else None)
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None  # as the unpickler numbers it
        elif name in _MEMO_PUT:
            memo[arg] = recent[-1] if recent else None
        elif name in _MEMO_GET:
            recent.append(memo.get(arg))
        elif name == "STOP":
            break
        elif name == "FRAME":
            continue  # leaves the stack as it is
        else:
            recent.append(None)
        del recent[:-4]
    return found


def _python3_name(module: str, qualname: str, proto: int) -> str:
    """The name the unpickler resolves: protocols < 3 use Python 2 spellings
    (``__builtin__.exec``, ``commands.call``) that it maps as ``find_class`` does."""
    if proto < 3:
        if (module, qualname) in _compat_pickle.NAME_MAPPING:
            module, qualname = _compat_pickle.NAME_MAPPING[(module, qualname)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{qualname}"


def check(subject: str, globals_: list[str]) -> None:
    """Raise when any referenced global is outside the allowlist (naming all of them)."""
    bad = sorted(set(g for g in globals_ if g not in ALLOWED))
    if not bad:
        return
    if set(bad) <= LAZY_GLOBALS:
        raise LazyParameterError(
            subject,
            "holds uninitialised lazy parameters (nn.LazyLinear and friends before their "
            "first forward pass): they have no shape and no values",
            remedy="run the model once on an example input, then save its state_dict() again",
        )
    raise UnsafePickleError(
        subject,
        bad,
        problem=f"unpickling would need globals outside nnconv's allowlist: {', '.join(bad)}",
        remedy="pass --trust-pickle only if you trust this file: it lets the file run code",
    )


def scan_bytes(subject: str, data: bytes) -> list[str]:
    """Globals of one pickle held in memory, with malformed pickles as FormatError."""
    try:
        return scan(io.BytesIO(data))
    except Exception as exc:  # pickletools raises ValueError and friends
        raise FormatError(subject, f"corrupt pickle: {exc}") from None
