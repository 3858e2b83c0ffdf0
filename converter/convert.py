"""load / save / convert: the library calls behind ``nnconv convert``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnconv.formats import registry
from nnconv.formats.atomic import resolve_destination
from nnconv.formats.checkpoint import Checkpoint
from nnconv.formats.errors import UsageError
from nnconv.formats.keys import ARCHITECTURE_KEY, HF_KEY
from nnconv.formats.objects import cast, from_object
from nnconv.formats.source import Source, open_source

from . import hf, models, past, quantization
from . import record as arch
from .export import ExportResult, export_onnx
from .export_pt2 import export_pt2
from .golden import check_declared_size
from .inputs import (
    ExampleInputs,
    InputSpec,
    Shapes,
    derivation,
    given_inputs,
    input_specs,
    named_specs,
    shape_list,
)
from .onnx_import import MappingRow, map_to_state_dict
from .options import OnnxOptions, onnx_options, write_options
from .state_dicts import select_subtree

if TYPE_CHECKING:
    from torch import nn

PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)
# The runtime an exported format's files run in (Capabilities.runtime) -> its exporter.
EXPORTERS: dict[str, Callable[..., ExportResult]] = {
    "onnxruntime": export_onnx,
    "torch.export": export_pt2,
}


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion did: formats, counts, bytes, the cast, the model and export used."""

    source: str
    destination: str
    source_format: str
    destination_format: str
    tensors: int
    aliases: int
    nbytes: int
    dtype: str | None
    model_source: str | None = None  # "spec" | "record" | "module-pickle" | "torchscript"
    export: ExportResult | None = None
    mapping: list[MappingRow] = field(default_factory=list)  # ONNX import: key <- initializer
    missing: list[str] = field(default_factory=list)


def load(path: PathLike, *, format: str | None = None, trust_code: bool = False) -> Checkpoint:
    """Read a model file (any registered format) into a lazy :class:`Checkpoint`.

    ``format`` overrides detection by content and extension.  Call
    ``nnconv.formats.checkpoint.to_object(ckpt)`` for the Python object
    ``torch.load`` would give.  A whole-module pickle (torch.nn built-ins only,
    unless ``trust_code``) or a TorchScript archive reads as its module's state_dict,
    without running anything.
    """
    source = open_source(path, format=format, trust_code=trust_code)
    return weights(source) if source.kind == "module" else source.take()


def weights(source: Source) -> Checkpoint:
    """A source's weights: its checkpoint (kept by the source), or, for a whole-module
    pickle, its module's state_dict (the caller's)."""
    if source.kind == "module":
        loaded = models.load_model(source, trust_code=source.trust_code)
        return _checkpoint(source, loaded)
    return source.checkpoint()


def save(
    obj: Any,
    path: PathLike,
    *,
    format: str | None = None,
    force: bool = False,
    shard_size: int | str | None = None,
    compression: str | None = None,
    dtype: str | None = None,
    progress: Callable[[int], None] | None = None,
    fsync: bool = False,
) -> None:
    """Write a :class:`Checkpoint` or a ``torch.save``-able object (tensor, list, dict,
    state_dict, training checkpoint) atomically in ``format`` (default: from the extension).
    ``fsync`` flushes it to disk before the rename (durable across a power cut).
    """
    ckpt = obj if isinstance(obj, Checkpoint) else from_object(obj)
    ckpt = quantization.require_cast(ckpt, dtype, path)  # GGUF: dequantised only with --dtype
    if dtype:
        ckpt = cast(ckpt, dtype)
    adapter = _destination_adapter(path, format, shard_size)
    if not adapter.CAPABILITIES.writes:
        how = " (it is written by exporting a model)" if adapter.CAPABILITIES.exported else ""
        raise UsageError(path, f"nnconv can read {adapter.NAME} but not write it{how}")
    options = write_options(force, shard_size, compression, fsync, progress)
    registry.check_options(adapter, options, path)
    adapter.write(ckpt, Path(path), options=options)


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    dtype: str | None = None,
    shard_size: int | str | None = None,
    compression: str | None = None,
    force: bool = False,
    fsync: bool = False,
    trust_code: bool = False,
    model: str | type[nn.Module] | nn.Module | None = None,
    model_args: str | Mapping[str, Any] | None = None,
    key: str | None = None,
    input_shapes: Shapes = (),
    input_dtype: str | None = None,
    named_inputs: Sequence[str] = (),
    example_inputs: ExampleInputs | None = None,
    onnx: OnnxOptions | None = None,
    opset: int | None = None,
    dynamic_batch: bool | None = None,
    exporter: str | None = None,
    optimize: bool | None = None,
    allow_missing: bool | None = None,
    with_past: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Convert ``src`` into ``dst`` losslessly (or cast floats to ``dtype``).

    ``model`` (``path.py:Class`` or ``package.module:Class``, called with the
    JSON ``model_args``) makes the weights runnable: it is needed to export
    weights to ONNX (with ``input_shapes`` such as ``["2,20"]``) unless the
    source describes its model itself, maps ONNX initializers back to the
    model's state_dict keys, and otherwise embeds nnconv's architecture record.
    ``model`` may also be an ``nn.Module`` class or instance, ``input_shapes``
    tuples, ``named_inputs`` ``"NAME=SHAPE[:DTYPE]"`` strings (the model is called by
    keyword and the graph's inputs take those names), ``example_inputs`` the tensors
    to export with (a tensor, a tuple, or a dict by input name); ONNX options come as
    keywords (``opset=17``, ``dynamic_batch=False``, ``exporter``, ``optimize``,
    ``allow_missing``, ``with_past``) or as one :class:`OnnxOptions`.
    The destination is written atomically and never equals the source.
    ``progress(done_bytes, total_bytes)`` is called as tensors are written.
    """
    src, dst = Path(src), Path(dst)
    # Resolve the destination format before reading anything: fail fast on typos.
    dst_adapter = _destination_adapter(dst, dst_format, shard_size)
    registry.check_options(dst_adapter, write_options(force, shard_size, compression, fsync), dst)
    # An existing folder is written into (DIR/<stem>.<ext>, or shards beside its files).
    dst = resolve_destination(
        dst, source=src, extension=dst_adapter.EXTENSIONS[0], sharded=bool(shard_size), force=force
    )
    spec = models.model_spec(model, model_args)
    onnx = onnx_options(onnx, opset, dynamic_batch, exporter, optimize, allow_missing, with_past)
    examples = given_inputs(example_inputs, input_shapes, input_dtype)
    if named_inputs:  # --input NAME=SHAPE[:DTYPE]: exported by keyword, graph inputs named so
        if input_shapes or input_dtype or example_inputs is not None:
            raise UsageError(None, "--input excludes --input-shape, --input-dtype, example_inputs")
        examples = (named_specs(named_inputs), None, True)
    input_shapes = shape_list(input_shapes)
    inputs = input_specs(input_shapes, input_dtype) if input_shapes else examples[0]
    exported = dst_adapter.CAPABILITIES.exported  # a graph made from a model, not weights
    if dtype and exported:
        raise UsageError(
            dst, f"--dtype applies to weight formats, not to {dst_adapter.NAME} export"
        )
    with open_source(src, format=src_format, trust_code=trust_code) as source:
        if not exported:
            options = dict(force=force, shard_size=shard_size, compression=compression, fsync=fsync)
            return _convert(
                source, dst, dst_adapter.NAME, spec, key, inputs, onnx, progress, dtype, options
            )
        return _export(
            source,
            dst,
            spec=spec,
            key=key,
            inputs=inputs,
            examples=examples,
            force=force,
            fsync=fsync,
            trust_code=trust_code,
            options=onnx,
            dst_format=dst_adapter.NAME,
            runtime=dst_adapter.CAPABILITIES.runtime,
        )


def _convert(
    source: Source,
    dst: Path,
    dst_format: str,
    spec: models.ModelSpec | None,
    key: str | None,
    inputs: list[InputSpec],
    onnx: OnnxOptions,
    progress: Progress | None,
    dtype: str | None,
    save_options: dict[str, Any],
) -> ConvertResult:
    """Weights to a weight format: mapped back from a graph when a model names them,
    from a whole module's state_dict, or as the file holds them (plus a record)."""
    src, trust_code = source.path, source.trust_code
    save_options = {"format": dst_format, "dtype": dtype, **save_options}
    described = source.kind == "graph" and spec is None and hf.onnx_describes(source)
    if source.kind == "graph" and (spec is not None or described):
        ckpt = source.checkpoint()
        module = (
            models.instantiate(spec)
            if spec is not None
            else hf.from_metadata(ckpt.metadata, src, trust_code=trust_code)
        )
        if module is None:  # onnx_describes() said the record is there
            raise UsageError(src, "no model", remedy="pass --model path.py:Class")
        imported = map_to_state_dict(ckpt, module, allow_missing=onnx.allow_missing, source=source)
        _save_with_progress(imported.checkpoint, dst, save_options, progress)
        return _result(
            src,
            dst,
            ckpt,
            imported.checkpoint,
            save_options,
            hf.SOURCE if described else "spec",
            mapping=imported.mapping,
            missing=imported.missing,
        )
    loaded = None
    if spec is not None or source.kind == "module":
        loaded = models.load_model(source, spec=spec, key=key, trust_code=trust_code)
    ckpt = _checkpoint(source, loaded)
    # --key (or the sub-dict a --model picked) is what gets written, not the whole file
    chosen = key if loaded is None else loaded.selection and loaded.selection.key_used
    out = select_subtree(ckpt, chosen, str(src)) if chosen else ckpt
    if loaded is not None and loaded.source != "torchscript":
        record = arch.build(
            loaded.module,
            inputs or _recorded_inputs(loaded),
            model_args=spec.args if spec else None,
            folder=dst if save_options["shard_size"] else dst.parent,  # class files: relative
        )
        out = replace(out, metadata={**out.metadata, ARCHITECTURE_KEY: arch.dumps(record)})
    _save_with_progress(out, dst, save_options, progress)
    return _result(src, dst, ckpt, out, save_options, loaded.source if loaded else None)


def _export(
    source: Source,
    dst: Path,
    *,
    spec: models.ModelSpec | None,
    key: str | None,
    inputs: list[InputSpec],
    examples: tuple[list[InputSpec], tuple[Any, ...] | None, bool],
    force: bool,
    fsync: bool,
    trust_code: bool,
    options: OnnxOptions,
    dst_format: str,
    runtime: str,
) -> ConvertResult:
    """Weights + model -> ONNX, recording the architecture in the ONNX metadata."""
    loaded = models.load_model(source, spec=spec, key=key, trust_code=trust_code)
    _, tensors, by_name = examples
    keywords = by_name or (loaded.source == hf.SOURCE and not inputs)  # input_ids=...
    if options.with_past:  # the wrapper takes the past positionally, named in the graph
        loaded, keywords = past.prepare(loaded, bool(inputs or tensors)), False
    if not inputs and (declared := _recorded_inputs(loaded)):
        check_declared_size(declared)  # a file's claim: at most 256 MiB of random inputs
    inputs = inputs or _recorded_inputs(loaded) or _derived_inputs(loaded, dst)
    metadata = {}
    if loaded.source == hf.SOURCE:  # transformers' class and config, not a module record
        metadata[HF_KEY] = json.dumps(loaded.record, separators=(",", ":"))
    elif loaded.source != "torchscript":
        args = spec.args if spec else None
        record = arch.build(loaded.module, inputs, model_args=args, folder=dst.parent)
        metadata[ARCHITECTURE_KEY] = arch.dumps(record)
    result = EXPORTERS[runtime](  # the runtime the destination's files run in
        loaded.module,
        dst,
        inputs=inputs,
        opset=options.opset,
        dynamic_batch=options.dynamic_batch,
        exporter=options.exporter,
        optimize=options.optimize,
        external_data_threshold=options.external_data_threshold,
        force=force,
        fsync=fsync,
        metadata=metadata,
        keywords=keywords,
        examples=tensors,
        output_names=past.output_names(loaded.record),
    )
    state = loaded.module.state_dict()
    return ConvertResult(
        source=str(source.path),
        destination=str(dst),
        source_format=source.format,
        destination_format=dst_format,
        tensors=len(state),
        aliases=0,
        nbytes=result.parameters_bytes,
        dtype=None,
        model_source=loaded.source,
        export=result,
    )


def _destination_adapter(dst: PathLike, format: str | None, shard_size: int | str | None) -> Any:
    """``--to``, else the extension; with ``--shard-size``, a name without a known
    extension is a folder of shards in the format that shards (safetensors)."""
    if format:
        return registry.get(format)
    try:
        return registry.for_destination(dst)
    except UsageError:
        if shard_size and registry.taking("shard_size"):
            return registry.taking("shard_size")[0]
        raise


def _derived_inputs(loaded: models.LoadedModel, dst: Path) -> list[InputSpec]:
    """Export inputs from the model's first layer where they are the model's own (a
    Linear's features: only the batch varies); else the error names that layer."""
    found = derivation(loaded.module)
    if found.specs and found.exact:
        return found.specs
    why = found.why_not or (
        f"the first layer {found.layer} gives the channels, not the size the graph will fix"
    )
    raise UsageError(dst, f"exporting to ONNX needs example inputs: {why}", remedy=found.remedy)


def _recorded_inputs(loaded: models.LoadedModel) -> list[InputSpec]:
    """The inputs a record (or an HF config) declares: claims, bounded where they are made."""
    if loaded.record and loaded.record.get("inputs"):
        return [InputSpec.from_json(i) for i in loaded.record["inputs"]]
    return []


def _checkpoint(source: Source, loaded: models.LoadedModel | None) -> Checkpoint:
    """The source's checkpoint; a whole-module file gives its module's state_dict."""
    if loaded is not None and loaded.source in ("module-pickle", "torchscript"):
        ckpt = from_object(loaded.module.state_dict(), subject=str(source.path))
        ckpt.format, ckpt.source = source.format, str(source.path)
        return ckpt
    return source.checkpoint()


def _save_with_progress(
    ckpt: Checkpoint, dst: Path, options: dict[str, Any], progress: Progress | None
) -> None:
    total = ckpt.nbytes if progress else 0
    save(ckpt, dst, **options, progress=(lambda done: progress(done, total)) if progress else None)


def _result(
    src: PathLike,
    dst: PathLike,
    ckpt: Checkpoint,
    out: Checkpoint,
    options: dict[str, Any],
    model_source: str | None,
    **extra: Any,
) -> ConvertResult:
    return ConvertResult(
        source=str(src),
        destination=str(dst),
        source_format=ckpt.format or "",
        destination_format=options["format"],
        tensors=len(out.tensors),
        aliases=len(out.aliases),
        nbytes=cast(out, options["dtype"]).nbytes if options["dtype"] else out.nbytes,  # written
        dtype=options["dtype"],
        model_source=model_source,
        **extra,
    )
