"""Export a runnable module to ONNX with its parameters intact.

Both torch exporters fold BatchNorm into convolutions and rename transposed
weights when optimising (the dynamo exporter even keeps ``conv1.weight`` as the
name of folded, different values), so nnconv exports *unoptimised* by default
(``optimize=False`` / ``do_constant_folding=False``) and records in the model's
metadata when ``optimize=True`` was asked for.  The dynamo exporter is tried
first; the TorchScript exporter is the fallback.  Below the external-data
threshold the ``.onnx`` is self-contained; above it the weights go to one
``NAME.onnx.data`` file beside it, and the pair is written atomically (data
first, then the model, whose appearance marks completion).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nnconv.formats.atomic import atomic_output, check_destination
from nnconv.formats.checkpoint import FORMAT_VERSION
from nnconv.formats.errors import NnconvError, UnsupportedError, UsageError
from nnconv.formats.keys import EXPORTER_KEY, OPTIMIZED_KEY, VERSION_KEY

from .inputs import InputSpec, example_tensors

EXPORTERS = ("auto", "dynamo", "torchscript")
# protobuf cannot serialise a message over 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


@dataclass(frozen=True)
class ExportResult:
    """What was written and how: the exporter used (and why a fallback happened)."""

    path: str
    exporter: str
    fallback_reason: str | None
    opset: int
    optimized: bool
    external_data: str | None  # the data file's name beside the model, when used
    parameters_bytes: int


def export_onnx(
    module,
    dst: str | os.PathLike[str],
    *,
    inputs: list[InputSpec],
    opset: int | None = None,
    dynamic_batch: bool = True,
    exporter: str = "auto",
    optimize: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    force: bool = False,
    fsync: bool = False,
    metadata: dict[str, str] | None = None,
    keywords: bool = False,
    examples: tuple | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> ExportResult:
    """Export ``module`` (in eval mode) to ``dst``; check it with ``onnx.checker``.
    ``keywords``: call it by the inputs' names (``input_ids=...``, transformers models),
    which the graph's inputs are then called.  ``examples``: the tensors to trace with
    (else seeded random ones of ``inputs``).  ``output_names``: the graph's outputs.
    ``dynamic_axes``: dynamic dimensions besides the batch, by input or output name
    (``{"input_ids": {1: "sequence"}}``; dimensions of one name are one dimension); by
    default the module's own ``onnx_dynamic_axes`` (``--with-past``'s lengths)."""
    import onnx

    dst = Path(dst)
    if exporter not in EXPORTERS:
        raise UsageError(None, f"unknown exporter {exporter!r}", remedy=f"use one of {EXPORTERS}")
    if not inputs:
        raise UsageError(dst, "exporting to ONNX needs example inputs", remedy="pass --input-shape")
    data_name = dst.name + ".data"
    check_destination(dst, force=force)
    example = examples if examples is not None else example_tensors(inputs, seed=0)
    module.eval()
    axes = dynamic_axes if dynamic_axes is not None else getattr(module, "onnx_dynamic_axes", None)
    call = Call(inputs, example, keywords, output_names, axes or {})
    proto, used, reason = _export(module, call, opset, dynamic_batch, exporter, optimize)
    props = {
        **(metadata or {}),
        VERSION_KEY: FORMAT_VERSION,
        EXPORTER_KEY: used,
        OPTIMIZED_KEY: "1" if optimize else "0",
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    total = sum(_tensor_bytes(t) for t in proto.graph.initializer)
    external = total >= external_data_threshold
    data_path = dst.with_name(data_name)
    try:
        with atomic_output(dst, force=force, fsync=fsync) as tmp_model:
            if external:  # the data file lands first; the model's arrival marks completion
                with atomic_output(data_path, force=True, fsync=fsync) as tmp_data:
                    _externalise(proto, tmp_data, data_name)
            tmp_model.write_bytes(proto.SerializeToString())
            _check(onnx, tmp_model, dst)  # by path, so external data resolves beside it
    except BaseException:
        if external:
            data_path.unlink(missing_ok=True)
        raise
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportResult(
        path=str(dst),
        exporter=used,
        fallback_reason=reason,
        opset=opset_used,
        optimized=optimize,
        external_data=data_name if external else None,
        parameters_bytes=total,
    )


@dataclass(frozen=True)
class Call:
    """How the exporters call the module: positionally, or by the inputs' names."""

    inputs: list[InputSpec]
    example: tuple
    keywords: bool = False
    outputs: list[str] | None = None
    axes: dict[str, dict[int, str]] = field(default_factory=dict)  # besides the batch

    @property
    def args(self) -> tuple:
        return () if self.keywords else tuple(self.example)

    @property
    def kwargs(self) -> dict | None:
        return dict(zip(_names(self.inputs), self.example, strict=True)) if self.keywords else None

    def shapes(self, per_input: list) -> tuple | dict:
        if self.keywords:
            return dict(zip(_names(self.inputs), per_input, strict=True))
        return tuple(per_input)

    def dynamic(self, dynamic_batch: bool) -> dict[str, dict[int, str]]:
        """Every dynamic dimension by input or output name: the batch (axis 0 of every
        input that has one, and of the outputs named in ``axes``), then ``axes``."""
        batch = {0: "batch"} if dynamic_batch else {}
        found = {s.name: dict(batch) for s in self.inputs if dynamic_batch and len(s.shape)}
        for name, dims in self.axes.items():
            found[name] = {**batch, **found.get(name, {}), **dims}
        return found


def _export(module, call: Call, opset, dynamic_batch, exporter, optimize):
    """(ModelProto, exporter used, why the fallback happened or None)."""
    reason = None
    if exporter in ("auto", "dynamo"):
        try:
            return _dynamo(module, call, opset, dynamic_batch, optimize), "dynamo", None
        except Exception as exc:  # the dynamo exporter fails in many model-specific ways
            if exporter == "dynamo":
                raise UnsupportedError(
                    None,
                    f"the dynamo exporter failed: {_first_line(exc)}",
                    remedy="try --exporter torchscript",
                ) from None
            reason = f"dynamo exporter failed: {_cause(exc)}"
    try:
        proto = _torchscript(module, call, opset, dynamic_batch, optimize)
    except Exception as exc:
        failed = f"the TorchScript exporter failed: {_cause(exc)}"
        if reason:  # every exporter's error, not only the fallback's
            failed = f"{reason.replace('dynamo exporter', 'the dynamo exporter')}; {failed}"
        raise UnsupportedError(None, f"ONNX export failed: {failed}") from None
    return proto, "torchscript", reason


def _names(inputs: list[InputSpec]) -> list[str]:
    return [spec.name for spec in inputs]


def _dynamo(module, call: Call, opset, dynamic_batch, optimize):
    import torch

    shapes = None
    axes = call.dynamic(dynamic_batch)
    if axes:  # one torch.export.Dim per dimension name
        dims: dict[str, object] = {}
        make = torch.export.Dim
        per_input = [
            {a: dims.setdefault(n, make(re.sub(r"\W+", "_", n))) for a, n in axes[s.name].items()}
            if s.name in axes and len(s.shape)
            else {}
            for s in call.inputs
        ]
        shapes = call.shapes(per_input)
    with quiet():
        program = torch.onnx.export(
            module,
            call.args,
            kwargs=call.kwargs,
            dynamo=True,
            optimize=optimize,
            input_names=_names(call.inputs),
            output_names=call.outputs,
            dynamic_shapes=shapes,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    return _name_dims(program.model_proto, axes)


def _torchscript(module, call: Call, opset, dynamic_batch, optimize):
    import onnx
    import torch

    names = _names(call.inputs)
    axes = call.dynamic(dynamic_batch)
    with quiet(), tempfile.TemporaryDirectory(prefix="nnconv-export-") as tmp:
        # Through a file path the TorchScript exporter handles models over 2 GiB itself.
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            call.args,
            str(path),
            kwargs=call.kwargs,
            dynamo=False,
            do_constant_folding=optimize,
            input_names=names,
            output_names=call.outputs,
            dynamic_axes=axes or None,
            opset_version=opset,
        )
        proto = onnx.load(str(path), load_external_data=True)
    if dynamic_batch:
        for output in proto.graph.output:
            dims = output.type.tensor_type.shape.dim
            if len(dims) and dims[0].HasField("dim_value"):
                dims[0].dim_param = "batch"
    return _name_dims(proto, axes)


def _name_dims(proto, axes: dict[str, dict[int, str]]):
    """The graph's inputs and outputs named in ``axes`` get those dimension names (the
    exporters name a dimension they derive as they like: ``s3``, ``mask``)."""
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.get(value.name, {}).items():
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = name
    return proto


@contextlib.contextmanager
def quiet():
    """The exporters print progress and warnings; the library must not."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]  # C++ parts of the exporters print to the raw descriptors
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
        onnx_logger.setLevel(level)


def _tensor_bytes(tensor) -> int:
    from onnx import helper

    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    n = 1
    for d in tensor.dims:
        n *= d
    return n * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _externalise(proto, data_path: Path, location: str) -> None:
    """Move every initializer's bytes into one data file, tensor by tensor."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import set_external_data

    offset = 0
    with open(data_path, "wb") as fh:
        for tensor in proto.graph.initializer:
            raw = tensor.raw_data if tensor.HasField("raw_data") else None
            if raw is None:
                raw = numpy_helper.to_array(tensor).tobytes()
            pad = -offset % 64  # onnx aligns external tensors for mmap-friendly reads
            fh.write(b"\0" * pad)
            offset += pad
            fh.write(raw)
            set_external_data(tensor, location=location, offset=offset, length=len(raw))
            tensor.data_location = TensorProto.EXTERNAL
            for field in (
                "raw_data",
                "float_data",
                "int32_data",
                "int64_data",
                "double_data",
                "uint64_data",
            ):
                tensor.ClearField(field)
            offset += len(raw)


def _check(onnx, model_path: Path, dst: Path) -> None:
    try:
        onnx.checker.check_model(str(model_path))
    except Exception as exc:
        raise NnconvError(dst, f"exported model fails onnx.checker: {_first_line(exc)}") from None


def _cause(exc: BaseException) -> str:
    """The exporter's message, and the error at the root of it when that is another
    (the dynamo exporter wraps the model's own error in "Failed to decompose...")."""
    root, seen = exc, {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    head = _first_line(exc)
    return head if root is exc else f"{head} ({_first_line(root)[:200]})"


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporters' terminal colours
    return text.splitlines()[0][:300] if text else type(exc).__name__
