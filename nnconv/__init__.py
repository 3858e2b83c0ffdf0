"""nnconv: lossless model-weight conversion and verification for PyTorch models.

The public library in one namespace (the code lives in ``nnconv.converter``, the upper
layer, and ``nnconv.formats``, the lower one)::

    import nnconv

    nnconv.convert("model.pt", "model.safetensors", dtype="bfloat16")
    report = nnconv.verify("model.pt", "model.onnx", model=Net, input_shapes=[(1, 3, 224, 224)])
    assert report, report.render()

Every error nnconv raises on purpose is an :class:`NnconvError`.
"""

from importlib import metadata as _metadata

from nnconv.converter.convert import ConvertResult, convert, load, save
from nnconv.converter.inspect import InspectReport, inspect
from nnconv.converter.options import OnnxOptions
from nnconv.converter.report import VerifyReport
from nnconv.converter.verify import verify
from nnconv.formats import (
    Checkpoint,
    DestinationError,
    FormatError,
    LazyParameterError,
    NnconvError,
    NoModelError,
    UnsafePickleError,
    UnsupportedError,
    UntrustedCodeError,
    UsageError,
    from_object,
    to_object,
)

try:
    __version__ = _metadata.version("nnconv")
except _metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Checkpoint",
    "ConvertResult",
    "DestinationError",
    "FormatError",
    "InspectReport",
    "LazyParameterError",
    "NnconvError",
    "NoModelError",
    "OnnxOptions",
    "UnsafePickleError",
    "UnsupportedError",
    "UntrustedCodeError",
    "UsageError",
    "VerifyReport",
    "__version__",
    "convert",
    "from_object",
    "inspect",
    "load",
    "save",
    "to_object",
    "verify",
]
