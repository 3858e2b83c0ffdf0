"""nnconv.formats: the lower layer. The shared core (checkpoint model, errors, metadata
keys, the adapter protocol, registry, sources, pickle gate, byte IO) and one folder per
format holding its adapter. Never imports ``nnconv.converter``."""

from .checkpoint import Checkpoint, LazyTensor
from .errors import (
    DestinationError,
    FormatError,
    LazyParameterError,
    NnconvError,
    NoModelError,
    UnsafePickleError,
    UnsupportedError,
    UntrustedCodeError,
    UsageError,
)
from .objects import cast, from_object, to_object

__all__ = [
    "Checkpoint",
    "DestinationError",
    "FormatError",
    "LazyParameterError",
    "LazyTensor",
    "NnconvError",
    "NoModelError",
    "UnsafePickleError",
    "UnsupportedError",
    "UntrustedCodeError",
    "UsageError",
    "cast",
    "from_object",
    "to_object",
]
