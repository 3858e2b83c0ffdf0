"""The ``nnconv`` command line: the edge where errors become one ``Error:`` line.

The library raises :class:`NnconvError`; this module prints it on stderr and
exits 2.  Nothing else in nnconv prints or exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import click

from nnconv.formats import dtypes, registry
from nnconv.formats.errors import NnconvError

from . import past
from .cli_options import INPUTS, MODEL, SIZE, TOLERANCES, TRUST
from .export import EXPORTERS
from .inspect import human_bytes

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2
FORMAT_NAMES = click.Choice(list(registry.ADAPTERS))
TRUSTED = "--trust-code: the source was allowed to run code"


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(EXIT_ERROR)


class _Group(click.Group):
    """Turns every exception into one line and exit 2 (``NNCONV_DEBUG=1`` shows tracebacks)."""

    def main(self, *args, **kwargs):
        kwargs.setdefault("standalone_mode", False)
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            _fail("interrupted")
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
            sys.exit(EXIT_ERROR)
        except click.ClickException as exc:
            if exc.exit_code == 0:
                sys.exit(0)
            _fail(exc.format_message().replace("\n", " "))
        except NnconvError as exc:
            _fail(exc.cli_message().replace("\n", " "))
        except KeyboardInterrupt:
            _fail("interrupted")
        except Exception as exc:  # a bug or an unexpected library failure: still one line
            if os.environ.get("NNCONV_DEBUG"):
                traceback.print_exc()
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _fail(f"unexpected {type(exc).__name__}: {detail} (set NNCONV_DEBUG=1 for details)")
        sys.exit(result if isinstance(result, int) else EXIT_OK)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nnconv")
def cli() -> None:
    """Convert model weights between PyTorch, safetensors, HDF5 and ONNX, losslessly, and
    verify that files hold the same model."""


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True, path_type=str))
@click.argument("dst", type=click.Path(dir_okay=True, path_type=str))
@click.option("--from", "src_format", type=FORMAT_NAMES, help="Source format (else detected).")
@click.option("--to", "dst_format", type=FORMAT_NAMES, help="Destination format (else from DST).")
@click.option("--shard-size", type=SIZE, help="Shard safetensors output, e.g. 5GB, 500MiB.")
@click.option("--dtype", type=click.Choice(dtypes.CAST_TARGETS), help="Cast floating tensors.")
@click.option("--compression", type=click.Choice(["gzip", "lzf"]), help="HDF5 compression.")
@click.option("--force", is_flag=True, help="Replace an existing destination.")
@click.option("--fsync", is_flag=True, help="Flush DST to disk before renaming it into place.")
@TRUST
@MODEL
@INPUTS
@click.option("--opset", type=int, help="ONNX opset version (default: the exporter's).")
@click.option("--static-batch", is_flag=True, help="ONNX: fix the batch dimension.")
@click.option(
    "--exporter",
    type=click.Choice(EXPORTERS),
    default="auto",
    show_default=True,
    help="ONNX exporter: auto tries dynamo, then the TorchScript exporter.",
)
@click.option("--optimize", is_flag=True, help="ONNX: let the exporter fold constants.")
@click.option("--allow-missing", is_flag=True, help="ONNX import: skip unrecoverable keys.")
@click.option(
    "--verify", "then_verify", is_flag=True, help="Verify DST against SRC (exit 1 if they differ)."
)
@TOLERANCES
@past.option
def convert(
    src,
    dst,
    src_format,
    dst_format,
    shard_size,
    dtype,
    compression,
    force,
    fsync,
    trust_code,
    model,
    model_args,
    key,
    input_shapes,
    input_dtype,
    named_inputs,
    opset,
    static_batch,
    exporter,
    optimize,
    allow_missing,
    then_verify,
    atol,
    rtol,
    with_past,
):
    """Convert SRC into DST (format from --to, else from DST's extension).

    Exporting to ONNX needs a runnable model: --model (or a self-describing
    source) and --input-shape.
    """
    from .convert import OnnxOptions
    from .convert import convert as run_convert

    if (atol or rtol) and not then_verify:
        raise click.UsageError("--atol and --rtol apply with --verify")

    onnx = OnnxOptions(
        opset=opset,
        dynamic_batch=not static_batch,
        exporter=exporter,
        optimize=optimize,
        allow_missing=allow_missing,
        with_past=with_past,
    )
    bar = _progress_bar()
    try:
        result = run_convert(
            src,
            dst,
            src_format=src_format,
            dst_format=dst_format,
            dtype=dtype,
            shard_size=shard_size,
            compression=compression,
            force=force,
            fsync=fsync,
            trust_code=trust_code,
            model=model,
            model_args=model_args,
            key=key,
            input_shapes=input_shapes,
            input_dtype=input_dtype,
            named_inputs=named_inputs,
            onnx=onnx,
            progress=bar.update if bar else None,
        )
    finally:
        if bar:
            bar.close()
    for row in result.mapping:
        if row.how != "name":
            source = f"{row.initializer} ({row.how}, {row.transform})"
            click.echo(f"  {row.key} <- {source}", err=True)
    for name in result.missing:
        click.echo(f"  {name}: not recovered (left out)", err=True)
    click.echo(_summary(result) + (f" ({TRUSTED})" if trust_code else ""))
    if then_verify:
        from .verify import verify as run_verify

        report = run_verify(
            src,
            dst,
            model=model,
            model_args=model_args,
            key=key,
            input_shapes=input_shapes,
            input_dtype=input_dtype,
            named_inputs=named_inputs,
            atol=atol,
            rtol=rtol,
            trust_code=trust_code,
            progress=_progress_lines(),
        )
        _emit_report(report, None)
        return EXIT_OK if report else EXIT_DIFFERENT
    return EXIT_OK


def _summary(result) -> str:
    head = (
        f"{result.source} ({result.source_format}) -> {result.destination} "
        f"({result.destination_format})"
    )
    if result.export:
        how = f"{result.export.exporter} exporter, opset {result.export.opset}"
        if result.export.fallback_reason:
            how += f" (fallback: {result.export.fallback_reason})"
        if result.export.external_data:
            how += f", weights in {result.export.external_data}"
        return f"{head}: {result.tensors} tensors, {human_bytes(result.nbytes)}, {how}"
    cast = f", cast to {result.dtype}" if result.dtype else ""
    aliases = f" (+{result.aliases} tied)" if result.aliases else ""
    model = f", model from {result.model_source}" if result.model_source else ""
    mapped = sum(1 for row in result.mapping if row.how not in ("name", "module default"))
    defaults = sum(1 for row in result.mapping if row.how == "module default")
    mapped_text = f", {mapped} names mapped back" if mapped else ""
    mapped_text += f", {defaults} from the model's defaults" if defaults else ""
    return (
        f"{head}: {result.tensors} tensors{aliases}, {human_bytes(result.nbytes)}"
        f"{cast}{model}{mapped_text}"
    )


@cli.command()
@click.argument("reference", type=click.Path(dir_okay=True, path_type=str))
@click.argument("candidates", nargs=-1, type=click.Path(dir_okay=True, path_type=str))
@MODEL
@INPUTS
@click.option("--inputs", "inputs_file", help="Inputs file: .npz, .pt or .safetensors.")
@click.option(
    "--device", type=click.Choice(["cpu", "cuda", "all"]), default="cpu", show_default=True
)
@TOLERANCES
@click.option("--params-only", is_flag=True, help="Compare parameters only.")
@click.option("--outputs-only", is_flag=True, help="Compare forward outputs only.")
@click.option("--strict", is_flag=True, help="Fail outputs that prove nothing (all zero, tiny).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inputs.")
@click.option("--json", "json_path", help="Write the JSON report to PATH (- for stdout).")
@click.option("--save-golden", help="Store the inputs and reference outputs (.safetensors).")
@click.option("--golden", help="Replay a golden file's inputs and compare its outputs.")
@click.option("--force", is_flag=True, help="Replace an existing --save-golden file.")
@TRUST
def verify(
    reference,
    candidates,
    model,
    model_args,
    key,
    input_shapes,
    input_dtype,
    named_inputs,
    inputs_file,
    device,
    atol,
    rtol,
    params_only,
    outputs_only,
    strict,
    seed,
    json_path,
    save_golden,
    golden,
    force,
    trust_code,
):
    """Prove CANDIDATES are the same model as REFERENCE: parameters and forward outputs.

    Exit status: 0 all passed, 1 a difference was found, 2 error.  With no
    candidate, REFERENCE must load strictly into --model and give finite outputs.
    """
    from .verify import verify as run_verify

    report = run_verify(
        reference,
        *candidates,
        model=model,
        model_args=model_args,
        key=key,
        input_shapes=input_shapes,
        input_dtype=input_dtype,
        named_inputs=named_inputs,
        inputs_file=inputs_file,
        device=device,
        atol=atol,
        rtol=rtol,
        params_only=params_only,
        outputs_only=outputs_only,
        strict=strict,
        seed=seed,
        trust_code=trust_code,
        save_golden=save_golden,
        golden=golden,
        force=force,
        progress=_progress_lines(),
    )
    _emit_report(report, json_path)
    return EXIT_OK if report else EXIT_DIFFERENT


def _emit_report(report, json_path: str | None) -> None:
    if json_path == "-":
        click.echo(json.dumps(report.to_json(), indent=2, allow_nan=False))
        return
    click.echo(report.render())
    if json_path:
        from nnconv.formats.atomic import atomic_output

        with atomic_output(Path(json_path), force=True) as tmp:
            tmp.write_text(json.dumps(report.to_json(), indent=2, allow_nan=False))


def _progress_lines():
    """Step messages on stderr, only on a terminal (pipelines keep a clean stderr)."""
    if not sys.stderr.isatty():
        return None
    return lambda message: click.echo(f"... {message}", err=True)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=True, path_type=str))
@click.option("--from", "src_format", type=FORMAT_NAMES, help="Format (else detected).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@TRUST
def inspect(file, src_format, as_json, trust_code):
    """Show FILE's format, metadata, tensors and module tree."""
    from .inspect import inspect as run_inspect

    report = run_inspect(file, format=src_format, trust_code=trust_code)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(report.render())


@cli.command()
def formats() -> None:
    """List the formats nnconv reads and writes."""
    for adapter in registry.ADAPTERS.values():
        can = adapter.CAPABILITIES  # exported: written by exporting a model (--model)
        mode = "read, write" if can.writes else "read, export" if can.exported else "read"
        click.echo(f"{adapter.NAME:<12} {mode:<12} {' '.join(adapter.EXTENSIONS)}")
        click.echo(f"{'':<12} {adapter.DESCRIPTION}")
        click.echo(f"{'':<12} keeps: {adapter.FEATURES}")


class _Bar:
    """A byte progress bar on stderr, shown only on a terminal."""

    def __init__(self) -> None:
        self._bar = None
        self._seen = 0

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = click.progressbar(
                length=max(total, 1), label="converting", file=sys.stderr, show_pos=False
            )
            self._bar.__enter__()
        self._bar.update(done - self._seen)
        self._seen = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _progress_bar() -> _Bar | None:
    return _Bar() if sys.stderr.isatty() else None


def main() -> None:
    """Console-script entry point."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # file-size limits become EFBIG errors
    cli.main(prog_name="nnconv")


if __name__ == "__main__":  # python -m nnconv.converter.cli
    main()
