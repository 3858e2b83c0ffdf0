"""Tolerances: ``--atol``/``--rtol`` (global or ``NAME:X``) over per-dtype defaults.

The defaults are ``torch.testing.assert_close``'s, so float32 is held to float32
precision and bfloat16 to bfloat16's, instead of one global atol that is too strict
for one and too loose for the other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nnconv.formats.errors import UsageError

# dtype -> (atol, rtol): torch.testing.assert_close's defaults.  torch has none for float8;
# these allow one step of the format's precision (3 mantissa bits: 2**-3, 2 bits: 2**-2,
# e8m0's powers of two: 1.0).  Integers and bool (absent) compare exactly.
DEFAULTS = {
    **dict.fromkeys(("float64", "complex128"), (1e-7, 1e-7)),
    **dict.fromkeys(("float32", "complex64"), (1e-5, 1.3e-6)),
    "float16": (1e-5, 1e-3),
    "bfloat16": (1e-5, 1.6e-2),
    **dict.fromkeys(("float8_e4m3fn", "float8_e4m3fnuz"), (1e-3, 0.125)),
    **dict.fromkeys(("float8_e5m2", "float8_e5m2fnuz"), (1e-3, 0.25)),
    "float8_e8m0fnu": (1e-3, 1.0),
}


@dataclass(frozen=True)
class Tolerances:
    """The user's ``--atol``/``--rtol`` (global and per name) over per-dtype defaults."""

    atol: float | None = None
    rtol: float | None = None
    atols: tuple[tuple[str, float], ...] = ()
    rtols: tuple[tuple[str, float], ...] = ()
    precision: str | None = None  # a recorded cast: floats held to that dtype's defaults too

    def _user(self, name: str) -> tuple[float | None, float | None]:
        """The overrides for ``name``, its nearest dotted parent ("enc" covers "enc.x"), or all."""
        parts = name.split(".")
        keys = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        sides = ((dict(self.atols), self.atol), (dict(self.rtols), self.rtol))
        return tuple(next((named[k] for k in keys if k in named), every) for named, every in sides)

    def given(self, name: str) -> bool:
        """Whether the user gave a tolerance covering ``name`` (or every name)."""
        return self._user(name) != (None, None)

    def for_output(self, name: str, dtype: Any) -> tuple[float, float]:
        """(atol, rtol): per-name override > global override > dtype default, each alone."""
        default = DEFAULTS.get(str(dtype).removeprefix("torch."), (0.0, 0.0))
        if self.precision in DEFAULTS and default != (0.0, 0.0):  # floats, not integers
            default = tuple(map(max, default, DEFAULTS[self.precision]))
        return tuple(d if u is None else u for d, u in zip(default, self._user(name), strict=True))

    def at_precision(self, dtype: str | None) -> Tolerances:
        """These tolerances for a candidate whose parameters were cast to ``dtype``: outputs
        cannot be closer than that dtype allows, so its defaults apply where coarser."""
        return self if dtype is None else dataclasses.replace(self, precision=dtype)

    def for_parameter(self, name: str, dtype: Any) -> tuple[float, float] | None:
        """None (bit-identity required) unless the user gave a tolerance covering ``name``."""
        return self.for_output(name, dtype) if self.given(name) else None


ToleranceArg = float | str | Sequence[float | str] | Mapping[str, float] | None


def _entries(value: ToleranceArg) -> list[str]:
    """The library's forms as CLI values: ``1e-4``, ``"1e-4"``, ``["fc:1e-3", 1e-5]`` or
    ``{"fc": 1e-3}`` (a name ``""`` is every output)."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"{name}:{x}" if name else str(x) for name, x in value.items()]
    if isinstance(value, str | int | float):
        return [str(value)]
    return [str(v) for v in value]


def parse_tolerances(atols: ToleranceArg = (), rtols: ToleranceArg = ()) -> Tolerances:
    """Tolerances from CLI values ``X`` (global) or ``NAME:X`` (split on the last colon)."""
    found: dict[str, dict[str | None, float]] = {"atol": {}, "rtol": {}}
    for option, values in (("atol", _entries(atols)), ("rtol", _entries(rtols))):
        for text in values:
            name, sep, number = str(text).rpartition(":")
            try:
                value = float(number)
            except ValueError:
                value = math.nan
            if math.isnan(value) or value < 0 or (sep and not name.strip()):
                problem = f"--{option} {text!r}: expected X or NAME:X with X a number >= 0"
                example = f"e.g. --{option} 1e-4 or --{option} encoder.fc.weight:1e-3"
                raise UsageError(None, problem, value=text, remedy=example)
            found[option][name.strip() if sep else None] = value  # the last one given wins
    atol, rtol = found["atol"].pop(None, None), found["rtol"].pop(None, None)
    return Tolerances(atol, rtol, tuple(found["atol"].items()), tuple(found["rtol"].items()))
