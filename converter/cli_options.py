"""The command line's option groups, each declared once and shared by the commands that
take it (``convert``, ``verify``, ``convert --verify``); the ParamTypes check sizes,
shapes, named inputs and tolerances while click parses them, with the library's own
parsers, so a bad value is one usage line naming the option before anything is read.
A new option is one field in its library group and one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from nnconv.formats import sharding
from nnconv.formats.errors import NnconvError

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
TRUST_HELP = (
    "Trust the file: allow its pickles, TorchScript and recorded classes to run code "
    "(--trust-pickle is an alias)."
)


class _Checked(click.ParamType):  # type: ignore[type-arg]
    """A value the library parses: its error becomes click's, the value passes on."""

    def __init__(self, name: str, parse: Callable[[str], Any], keep_text: bool = False) -> None:
        self.name, self._parse, self._keep_text = name, parse, keep_text

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            parsed = self._parse(value)
        except NnconvError as exc:
            self.fail(exc.cli_message(), param, ctx)
        return value if self._keep_text else parsed


def _shape(text: str) -> Any:
    from .inputs import parse_shape

    return parse_shape(text)


def _named(text: str) -> Any:
    from .inputs import named_specs

    return named_specs([text])


def _tolerance(text: str) -> Any:
    from .tolerances import parse_tolerances

    return parse_tolerances([text])


SIZE = _Checked("size", sharding.parse_size)
SHAPE = _Checked("shape", _shape, keep_text=True)
NAMED_INPUT = _Checked("NAME=SHAPE[:DTYPE]", _named, keep_text=True)
TOLERANCE = _Checked("tolerance", _tolerance, keep_text=True)


def group(*options: Decorator) -> Decorator:
    """Several options as one decorator, listed in ``--help`` in the order given."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


MODEL = group(
    click.option("--model", help="Model class: path/file.py:Class or package.module:Class."),
    click.option("--model-args", help="JSON keyword arguments for the model class."),
    click.option("--key", help="Where the state_dict sits in a training checkpoint, e.g. model."),
)
INPUTS = group(
    click.option(
        "--input-shape", "input_shapes", multiple=True, type=SHAPE, help="Input shape, e.g. 2,20."
    ),
    click.option("--input-dtype", help="dtype of the example inputs (default float32)."),
    click.option(
        "--input",
        "named_inputs",
        multiple=True,
        type=NAMED_INPUT,
        help="Named input NAME=SHAPE[:DTYPE], passed by keyword (repeatable).",
    ),
)
TOLERANCES = group(
    *(
        click.option(
            flag,
            multiple=True,
            type=TOLERANCE,
            help=f"{kind} tolerance {x} or NAME:{x} (repeatable; instead of the noise rule).",
        )
        for flag, kind, x in (("--atol", "Absolute", "X"), ("--rtol", "Relative", "Y"))
    )
)
TRUST = click.option("--trust-code", "--trust-pickle", "trust_code", is_flag=True, help=TRUST_HELP)
