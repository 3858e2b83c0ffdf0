"""The one exception family nnconv raises.

Every error names its *subject* (usually a file), the *problem*, and where it
helps the offending *value*, the *limit* it broke and a *remedy*.  Messages are written once, naming
options as CLI flags; ``str(error)`` names them as the library's keyword
arguments (``--input-shape 2,20`` reads ``input_shapes=['2,20']``), and the
CLI prints :meth:`NnconvError.cli_message` as a single ``Error: ...`` line.
Library users catch :class:`NnconvError`.
"""

from __future__ import annotations

import re
from os import PathLike
from typing import Any

# CLI flag -> library keyword argument.  Flags of one value, several values, or none.
ARGUMENTS = {
    "--model": "model",
    "--model-args": "model_args",
    "--key": "key",
    "--input-shape": "input_shapes",
    "--input": "named_inputs",
    "--input-dtype": "input_dtype",
    "--inputs": "inputs_file",
    "--dtype": "dtype",
    "--shard-size": "shard_size",
    "--compression": "compression",
    "--from": "src_format",
    "--to": "dst_format",
    "--device": "device",
    "--atol": "atol",
    "--rtol": "rtol",
    "--opset": "opset",
    "--exporter": "exporter",
    "--save-golden": "save_golden",
    "--golden": "golden",
}
LISTS = {"--input-shape", "--input", "--atol", "--rtol"}
SWITCHES = {
    "--trust-code": "trust_code=True",
    "--trust-pickle": "trust_code=True",
    "--force": "force=True",
    "--fsync": "fsync=True",
    "--params-only": "params_only=True",
    "--outputs-only": "outputs_only=True",
    "--optimize": "optimize=True",
    "--allow-missing": "allow_missing=True",
    "--static-batch": "dynamic_batch=False",
}
_FLAG = re.compile(r"--[a-z][a-z-]*[a-z](?:[ =](?P<value>[^\s;]+))?")
_VALUE = re.compile(r"[\d./:,'\"]")  # a value, not the next word of the sentence


def _as_argument(match: re.Match[str]) -> str:
    text: str = match.group(0)
    value: str | None = match.group("value")
    flag = text if value is None else text[: -len(value) - 1]
    if flag in SWITCHES:
        return SWITCHES[flag] + ("" if value is None else text[len(flag) :])
    name = ARGUMENTS.get(flag)
    if name is None:
        return text  # not an option of the library (--json, --help)
    bare = None if value is None else value.rstrip(").,:")
    if not bare or bare.startswith("-") or not _VALUE.search(bare):  # "--inputs holds 2..."
        return name + ("" if value is None else text[len(flag) :])
    quoted = len(bare) > 1 and bare[0] in "'\"" and bare[-1] == bare[0]
    shown = repr(bare[1:-1] if quoted else bare)
    shown = f"[{shown}]" if flag in LISTS else shown
    rest = (value or "")[len(bare) :]
    return f"{name}={shown}{rest}"


def as_arguments(text: str) -> str:
    """``text`` with CLI flags written as the library's keyword arguments."""
    return _FLAG.sub(_as_argument, text)


class NnconvError(Exception):
    """Base class of every error nnconv raises on purpose."""

    def __init__(
        self,
        subject: str | PathLike[str] | None,
        problem: str,
        *,
        value: object = None,
        limit: object = None,
        remedy: str | None = None,
    ) -> None:
        self.subject = None if subject is None else str(subject)
        self.problem = problem
        self.value = value
        self.limit = limit
        self.remedy = remedy
        super().__init__(str(self))

    def cli_message(self) -> str:
        """The message naming options as CLI flags, for ``Error: ...``."""
        text = self.problem if self.subject is None else f"{self.subject}: {self.problem}"
        if self.remedy:
            text += f" ({self.remedy})"
        return text

    def __str__(self) -> str:
        return as_arguments(self.cli_message())


class FormatError(NnconvError):
    """The file is missing, unrecognised, truncated, corrupt or inconsistent."""


class UntrustedCodeError(NnconvError):
    """Doing what was asked would run or import code the file chose (see
    :mod:`nnconv.formats.trust`); only ``--trust-code`` (``trust_code=True``) allows it."""


class UnsafePickleError(UntrustedCodeError):
    """Reading the file would need globals outside nnconv's allowlist."""

    def __init__(self, subject: str | PathLike[str], globals_: list[str], **kwargs: Any) -> None:
        self.globals = globals_
        super().__init__(subject, **kwargs)


class LazyParameterError(NnconvError):
    """The checkpoint holds uninitialised lazy parameters (no shapes, no values)."""


class UnsupportedError(NnconvError):
    """The target format cannot hold something the checkpoint has (dtype, object type...)."""


class DestinationError(NnconvError):
    """The destination cannot be written: exists, equals the source, not writable, disk full."""


class UsageError(NnconvError):
    """An option or argument is invalid (unknown format, bad size, option for another format)."""


class NoModelError(UsageError):
    """The file holds weights only and nothing names a model to run them (``--model``)."""
