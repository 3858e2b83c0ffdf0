"""nnconv.converter: the upper layer. Conversion, verification, inspection and the CLI,
built on ``nnconv.formats``.

The three calls live in modules of their own names (``nnconv.converter.convert``,
``.verify``, ``.inspect``), which this package does not shadow; the public functions
are gathered in ``nnconv`` itself::

    >>> import nnconv
    >>> nnconv.convert, nnconv.verify, nnconv.inspect, nnconv.load, nnconv.save
"""

from nnconv.formats.errors import NnconvError

from .convert import ConvertResult, load, save
from .inspect import InspectReport
from .options import OnnxOptions
from .report import VerifyReport

__all__ = [
    "ConvertResult",
    "InspectReport",
    "NnconvError",
    "OnnxOptions",
    "VerifyReport",
    "load",
    "save",
]
