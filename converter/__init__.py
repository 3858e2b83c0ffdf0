"""nnconv.converter: the upper layer. Conversion, inspection and the CLI, built on
``nnconv.formats``.

>>> from nnconv.converter import convert, inspect, load, save, verify
"""

from nnconv.formats.errors import NnconvError

from .convert import ConvertResult, convert, load, save
from .inspect import inspect
from .report import VerifyReport
from .verify import verify

__all__ = [
    "ConvertResult",
    "NnconvError",
    "VerifyReport",
    "convert",
    "inspect",
    "load",
    "save",
    "verify",
]
