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
from collections.abc import Sequence
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
        remedy="pass --trust-code only if you trust this file: it lets the file run code",
    )


def scan_bytes(subject: str, data: bytes) -> list[str]:
    """Globals of one pickle held in memory, with malformed pickles as FormatError."""
    try:
        return scan(io.BytesIO(data))
    except (ValueError, EOFError) as exc:  # what pickletools raises on corrupt data
        raise FormatError(subject, f"corrupt pickle: {exc}") from None


# --- whole-module pickles (torch.save(model)) --------------------------------
#
# A second, wider allowlist used only when the caller asks for a runnable
# module.  Every name is a torch.nn built-in *class* (plus the few values their
# pickled state holds): unpickling one calls ``cls.__new__`` and
# ``Module.__setstate__``, or at worst the class constructor, none of which can
# reach arbitrary code.  Lazy modules before their first forward pass are left
# out on purpose: their pickled hooks need ``builtins.getattr``.

_NN_CLASSES: dict[str, tuple[str, ...]] = {
    # Containers that hold the layers of Sequential-style models.
    "container": ("Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict"),
    # Affine layers; NonDynamicallyQuantizableLinear is MultiheadAttention's out_proj.
    "linear": ("Identity", "Linear", "Bilinear", "NonDynamicallyQuantizableLinear"),
    "conv": (
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
    ),
    # Normalisation layers (running statistics are plain buffers).
    "batchnorm": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"),
    "instancenorm": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"),
    "normalization": ("LayerNorm", "GroupNorm", "LocalResponseNorm", "RMSNorm"),
    # Parameter-free (or PReLU's one weight) activations, and attention.
    "activation": (
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "PReLU",
        "ELU",
        "SELU",
        "CELU",
        "GELU",
        "SiLU",
        "Mish",
        "Sigmoid",
        "Tanh",
        "Hardtanh",
        "Hardswish",
        "Hardsigmoid",
        "Hardshrink",
        "Softshrink",
        "Tanhshrink",
        "Softplus",
        "Softsign",
        "Softmax",
        "Softmax2d",
        "Softmin",
        "LogSoftmax",
        "LogSigmoid",
        "Threshold",
        "GLU",
        "MultiheadAttention",
    ),
    "dropout": ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"),
    "sparse": ("Embedding", "EmbeddingBag"),
    "rnn": ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"),
    "transformer": (
        "Transformer",
        "TransformerEncoder",
        "TransformerDecoder",
        "TransformerEncoderLayer",
        "TransformerDecoderLayer",
    ),
    # Shape-only layers: pooling, reshaping, padding, resampling.
    "pooling": tuple(
        f"{kind}{n}d"
        for kind in ("MaxPool", "AvgPool", "AdaptiveMaxPool", "AdaptiveAvgPool")
        for n in (1, 2, 3)
    ),
    "flatten": ("Flatten", "Unflatten"),
    "padding": tuple(
        f"{kind}{n}d"
        for kind in ("ZeroPad", "ConstantPad", "ReflectionPad", "ReplicationPad")
        for n in (1, 2, 3)
    ),
    "upsampling": ("Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d"),
    "pixelshuffle": ("PixelShuffle", "PixelUnshuffle"),
}

MODULE_EXTRAS: frozenset[str] = frozenset(
    {
        # A parameter pickled as itself rather than through torch._utils._rebuild_parameter.
        "torch.nn.parameter.Parameter",
        # Module._non_persistent_buffers_set: every module's pickled state holds one.
        "builtins.set",
        # The default activation functions Transformer*Layer store as attributes
        # (activation="relu" -> F.relu, activation="gelu" -> F.gelu, a C builtin).
        "torch.nn.functional.relu",
        "torch._C._nn.gelu",
    }
)

MODULE_ALLOWED: frozenset[str] = (
    ALLOWED
    | MODULE_EXTRAS
    | frozenset(
        f"torch.nn.modules.{sub}.{cls}" for sub, names in _NN_CLASSES.items() for cls in names
    )
)

# What a lazy module pickled before its first forward pass needs beyond the lazy
# parameters themselves (its registered hooks); still refused, with a better message.
_LAZY_HOOK_GLOBALS = frozenset(
    {
        "builtins.getattr",
        "torch.nn.modules.module._WrappedHook",
        "torch.utils.hooks.RemovableHandle",
    }
)


def is_module_pickle(globals_: Sequence[str]) -> bool:
    """Whether a torch.save file's globals show pickled modules (never in a state_dict)."""
    return any(g in MODULE_ALLOWED and g not in ALLOWED for g in globals_)


def check_module(subject: str, globals_: list[str]) -> None:
    """Like :func:`check` for a whole-module file: torch.nn built-ins are allowed too."""
    bad = sorted(set(g for g in globals_ if g not in MODULE_ALLOWED))
    if not bad:
        return
    lazy_parts = LAZY_GLOBALS | _LAZY_HOOK_GLOBALS
    if set(bad) & LAZY_GLOBALS and all(g in lazy_parts or _is_lazy_class(g) for g in bad):
        raise LazyParameterError(
            subject,
            "holds a module with uninitialised lazy parameters (nn.LazyLinear and friends "
            "before their first forward pass): they have no shape and no values",
            remedy="run the model once on an example input before saving it",
        )
    raise UnsafePickleError(
        subject,
        bad,
        problem="unpickling this module would need globals outside nnconv's allowlist of "
        f"torch.nn built-ins: {', '.join(bad)}",
        remedy="pass --trust-code only if you trust this file: it lets the file run code; "
        "or pass --model path.py:Class with a state_dict",
    )


def _is_lazy_class(name: str) -> bool:
    module, _, cls = name.rpartition(".")
    return module.startswith("torch.nn.modules.") and cls.startswith("Lazy") and cls.isidentifier()


def module_safe_globals(globals_: list[str]) -> list:
    """The objects behind a checked file's module globals, for
    ``torch.serialization.safe_globals`` (call only after :func:`check_module`)."""
    import importlib

    out = []
    for name in sorted(set(globals_) - ALLOWED):
        if name not in MODULE_ALLOWED:
            raise ValueError(f"{name} is not in the module allowlist")
        module, _, attr = name.rpartition(".")
        out.append((getattr(importlib.import_module(module), attr), name))
    return out
