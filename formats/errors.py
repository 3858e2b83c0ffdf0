"""The one exception family nnconv raises.

Every error names its *subject* (usually a file), the *problem*, and where it
helps the offending *value*, the *limit* it broke and a *remedy*.  The CLI
prints ``str(error)`` as a single ``Error: ...`` line; library users catch
:class:`NnconvError`.
"""

from __future__ import annotations

from os import PathLike


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

    def __str__(self) -> str:
        text = self.problem if self.subject is None else f"{self.subject}: {self.problem}"
        if self.remedy:
            text += f" ({self.remedy})"
        return text


class FormatError(NnconvError):
    """The file is missing, unrecognised, truncated, corrupt or inconsistent."""


class UntrustedCodeError(NnconvError):
    """Doing what was asked would run or import code the file chose (see
    :mod:`nnconv.formats.trust`); only ``--trust-code`` (``trust_code=True``) allows it."""


class UnsafePickleError(UntrustedCodeError):
    """Reading the file would need globals outside nnconv's allowlist."""

    def __init__(self, subject: str | PathLike[str], globals_: list[str], **kwargs) -> None:
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
