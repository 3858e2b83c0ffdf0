"""nnconv.converter: the upper layer. Conversion, inspection and the CLI, built on
``nnconv.formats``.

>>> from nnconv.converter import convert, inspect, load, save
"""

from nnconv.formats.errors import NnconvError

from .convert import ConvertResult, convert, load, save
from .inspect import inspect

__all__ = ["ConvertResult", "NnconvError", "convert", "inspect", "load", "save"]
