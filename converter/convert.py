"""load / save / convert: the library calls behind ``nnconv convert``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnconv.formats import registry, sharding
from nnconv.formats.atomic import resolve_destination
from nnconv.formats.checkpoint import Checkpoint
from nnconv.formats.errors import UsageError
from nnconv.formats.objects import cast, from_object
from nnconv.formats.options import WriteOptions
from nnconv.formats.pt import pt_format

from . import hf, models, past
from . import record as arch
from .export import EXTERNAL_DATA_THRESHOLD, ExportResult, export_onnx
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
from .state_dicts import select_subtree

if TYPE_CHECKING:
    from torch import nn

PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


@dataclass(frozen=True)
class OnnxOptions:
    """How to export to ONNX, and how strictly to map ONNX initializers back."""

    opset: int | None = None
    dynamic_batch: bool = True  # the first dimension is symbolic in the graph
    exporter: str = "auto"  # "auto" (dynamo, then TorchScript) | "dynamo" | "torchscript"
    optimize: bool = False  # let the exporter fold constants (changes parameters)
    allow_missing: bool = False  # ONNX import: leave out keys that cannot be recovered
    with_past: bool = False  # HF decoder LMs: past key/values as inputs and outputs
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD


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
    adapter = registry.detect(path, format=format)
    path = registry.weights_file(Path(path))  # a folder's pytorch_model.bin
    plain = pt_format.read_plain(path) if adapter is pt_format else None
    if plain is not None:  # tensors and containers only: no module, no pickle scan
        return plain
    if _holds_module(path, adapter):  # whole-module pickle: its state_dict
        loaded = models.load_model(path, trust_code=trust_code)
        return _checkpoint(path, format, trust_code, loaded)
    ckpt: Checkpoint = adapter.read(path, trust_code=trust_code)
    return ckpt


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
    if dtype:
        ckpt = cast(ckpt, dtype)
    adapter = _destination_adapter(path, format, shard_size)
    if not adapter.CAN_WRITE:
        raise UsageError(path, f"nnconv can read {adapter.NAME} but not write it")
    if isinstance(shard_size, str):
        shard_size = sharding.parse_size(shard_size)
    options = WriteOptions(
        force=force,
        shard_size=shard_size,
        compression=compression,
        progress=progress,
        fsync=fsync,
    )
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
    if shard_size and dst_adapter.NAME != "safetensors":
        raise UsageError(dst, "--shard-size applies to safetensors destinations only")
    if compression and dst_adapter.NAME != "hdf5":
        raise UsageError(dst, "--compression applies to hdf5 destinations only")
    # An existing folder is written into (DIR/<stem>.<ext>, or shards beside its files).
    dst = resolve_destination(
        dst, source=src, extension=dst_adapter.EXTENSIONS[0], sharded=bool(shard_size), force=force
    )
    spec = models.model_spec(model, model_args)
    onnx = _onnx_options(onnx, opset, dynamic_batch, exporter, optimize, allow_missing, with_past)
    examples = given_inputs(example_inputs, input_shapes, input_dtype)
    if named_inputs:  # --input NAME=SHAPE[:DTYPE]: exported by keyword, graph inputs named so
        if input_shapes or input_dtype or example_inputs is not None:
            raise UsageError(None, "--input excludes --input-shape, --input-dtype, example_inputs")
        examples = (named_specs(named_inputs), None, True)
    input_shapes = shape_list(input_shapes)
    inputs = input_specs(input_shapes, input_dtype) if input_shapes else examples[0]
    if dst_adapter.NAME == "onnx":
        if dtype:
            raise UsageError(dst, "--dtype applies to weight formats, not to ONNX export")
        return _export(
            src,
            dst,
            spec=spec,
            key=key,
            inputs=inputs,
            examples=examples,
            force=force,
            fsync=fsync,
            trust_code=trust_code,
            options=onnx,
        )
    src_adapter = registry.detect(src, format=src_format)
    save_options = dict(
        format=dst_adapter.NAME,
        force=force,
        shard_size=shard_size,
        compression=compression,
        dtype=dtype,
        fsync=fsync,
    )
    described = src_adapter.NAME == "onnx" and spec is None and hf.onnx_describes(src)
    if src_adapter.NAME == "onnx" and (spec is not None or described):
        with load(src, format=src_format) as ckpt:
            module = (
                models.instantiate(spec)
                if spec is not None
                else hf.from_metadata(ckpt.metadata, src, trust_code=trust_code)
            )
            if module is None:  # onnx_describes() said the record is there
                raise UsageError(src, "no model", remedy="pass --model path.py:Class")
            imported = map_to_state_dict(
                ckpt, module, allow_missing=onnx.allow_missing, onnx_path=src
            )
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
    plain = pt_format.read_plain(src) if spec is None and src_adapter is pt_format else None
    if plain is None and (spec is not None or _holds_module(src, src_adapter)):
        loaded = models.load_model(src, spec=spec, key=key, trust_code=trust_code)
    with plain or _checkpoint(src, src_format, trust_code, loaded) as ckpt:
        # --key (or the sub-dict a --model picked) is what gets written, not the whole file
        chosen = key if loaded is None else loaded.selection and loaded.selection.key_used
        out = select_subtree(ckpt, chosen, str(src)) if chosen else ckpt
        if loaded is not None and loaded.source != "torchscript":
            record = arch.build(
                loaded.module,
                inputs or _recorded_inputs(loaded),
                model_args=spec.args if spec else None,
                folder=dst if shard_size else dst.parent,  # class files relative to it
            )
            out = replace(out, metadata={**out.metadata, arch.ARCHITECTURE_KEY: arch.dumps(record)})
        _save_with_progress(out, dst, save_options, progress)
        return _result(src, dst, ckpt, out, save_options, loaded.source if loaded else None)


def _export(
    src: Path,
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
) -> ConvertResult:
    """Weights + model -> ONNX, recording the architecture in the ONNX metadata."""
    loaded = models.load_model(src, spec=spec, key=key, trust_code=trust_code)
    _, tensors, by_name = examples
    keywords = by_name or (loaded.source == hf.SOURCE and not inputs)  # input_ids=...
    if options.with_past:  # the wrapper takes the past positionally, named in the graph
        loaded, keywords = past.prepare(loaded, bool(inputs or tensors)), False
    if not inputs and (declared := _recorded_inputs(loaded)):
        check_declared_size(declared)  # a file's claim: at most 256 MiB of random inputs
    inputs = inputs or _recorded_inputs(loaded) or _derived_inputs(loaded, dst)
    metadata = {}
    if loaded.source == hf.SOURCE:  # transformers' class and config, not a module record
        metadata[hf.METADATA_KEY] = json.dumps(loaded.record, separators=(",", ":"))
    elif loaded.source != "torchscript":
        args = spec.args if spec else None
        record = arch.build(loaded.module, inputs, model_args=args, folder=dst.parent)
        metadata[arch.ARCHITECTURE_KEY] = arch.dumps(record)
    result = export_onnx(
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
        source=str(src),
        destination=str(dst),
        source_format=registry.detect(src).NAME,
        destination_format="onnx",
        tensors=len(state),
        aliases=0,
        nbytes=result.parameters_bytes,
        dtype=None,
        model_source=loaded.source,
        export=result,
    )


def _onnx_options(
    onnx: OnnxOptions | None,
    opset: int | None,
    dynamic_batch: bool | None,
    exporter: str | None,
    optimize: bool | None,
    allow_missing: bool | None,
    with_past: bool | None = None,
) -> OnnxOptions:
    """One :class:`OnnxOptions` from the object and the keywords (which win where given)."""
    given: dict[str, Any] = dict(
        opset=opset,
        dynamic_batch=dynamic_batch,
        exporter=exporter,
        optimize=optimize,
        allow_missing=allow_missing,
        with_past=with_past,
    )
    return replace(onnx or OnnxOptions(), **{k: v for k, v in given.items() if v is not None})


def _destination_adapter(dst: PathLike, format: str | None, shard_size: int | str | None) -> Any:
    """``--to``, else the extension; with ``--shard-size``, a name without a known
    extension is a safetensors folder (what sharding writes)."""
    if format:
        return registry.get(format)
    try:
        return registry.for_destination(dst)
    except UsageError:
        if shard_size:
            return registry.get("safetensors")
        raise


def _holds_module(src: Path, adapter: Any) -> bool:
    """A whole-module pickle: its weights come from the module.  (A TorchScript archive's
    weights are read by nnconv's restricted reader: running it is not needed.)"""
    if adapter.NAME != "pt" or models.is_torchscript(src):
        return False
    return models.is_module_pickle(pt_format.globals_in(src))


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


def _checkpoint(
    src: Path, src_format: str | None, trust_code: bool, loaded: models.LoadedModel | None
) -> Checkpoint:
    """The source's checkpoint; a whole-module file gives its module's state_dict."""
    if loaded is not None and loaded.source in ("module-pickle", "torchscript"):
        ckpt = from_object(loaded.module.state_dict(), subject=str(src))
        ckpt.format, ckpt.source = registry.detect(src).NAME, str(src)
        return ckpt
    return load(src, format=src_format, trust_code=trust_code)


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
