"""nnconv.formats: the lower layer. Checkpoint model, errors, registry, pickle gate,
one ``*_format.py`` adapter per format. Never imports ``nnconv.converter``."""

from .checkpoint import Checkpoint, LazyTensor
from .errors import (
    DestinationError,
    FormatError,
    LazyParameterError,
    NnconvError,
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
    "UnsafePickleError",
    "UnsupportedError",
    "UntrustedCodeError",
    "UsageError",
    "cast",
    "from_object",
    "to_object",
]
