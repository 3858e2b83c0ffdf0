"""Export a runnable module to ``.pt2`` (``torch.export``), and run a ``.pt2`` for verify.

:func:`export_pt2` mirrors :func:`.export.export_onnx` (same keywords, same
:class:`~.export.ExportResult`): ``torch.export.export`` on the module in eval mode,
the first dimension of every input symbolic (``batch``) unless ``dynamic_batch`` is
False, saved atomically by ``torch.export.save`` with the metadata (nnconv's
architecture record) as extra files; nnconv reads the file back before the rename.

Running a ``.pt2`` needs ``trust_code``.  ``torch.export.load`` (torch 2.13) is not a
pure reader of a graph of torch ops: it ``sympy.sympify``\\ s the program's
symbolic-shape strings (``eval`` of text from the file), ``.module()`` compiles and
runs the program's ``guards_code``, and the sample inputs are unpickled with a
fallback to ``torch.load(weights_only=False)`` (opaque constants by ``pickle.loads``).
None of that can be shown not to run code the file chooses, so a ``.pt2`` runs
exactly as a TorchScript archive does: only with ``--trust-code``.  Without it,
``verify`` compares the ``.pt2``'s parameters (read as data by
``nnconv.formats.pt2``) and says why its outputs were not run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nnconv.formats import trust
from nnconv.formats.atomic import atomic_output, check_destination
from nnconv.formats.errors import UnsupportedError, UsageError
from nnconv.formats.keys import ARCHITECTURE_KEY
from nnconv.formats.source import Source, open_source

from .export import Call, ExportResult, _cause, quiet
from .inputs import InputSpec, example_tensors

if TYPE_CHECKING:
    import torch

EXPORTER = "torch.export"


def export_pt2(
    module: Any,
    dst: str | os.PathLike[str],
    *,
    inputs: list[InputSpec],
    dynamic_batch: bool = True,
    force: bool = False,
    fsync: bool = False,
    metadata: dict[str, str] | None = None,
    keywords: bool = False,
    examples: tuple | None = None,
    **onnx_only: Any,
) -> ExportResult:
    """Export ``module`` (in eval mode) to ``dst`` with ``torch.export``.  It takes what
    ``export_onnx`` takes (convert calls either): of the ONNX-only keywords, ``opset``,
    ``optimize`` and an ``exporter`` other than auto/dynamo are refused; the rest (external
    data, output names, dynamic axes) do not apply to one file that keeps the module's
    output structure."""
    import torch

    dst = Path(dst)
    given = {"--opset": onnx_only.get("opset") is not None, "--optimize": onnx_only.get("optimize")}
    given["--exporter torchscript"] = onnx_only.get("exporter", "auto") not in ("auto", "dynamo")
    wrong = [flag for flag, on in given.items() if on]
    if wrong:
        raise UsageError(dst, f"{wrong[0]} applies to ONNX export, not to .pt2")
    if not inputs:
        raise UsageError(dst, "exporting to .pt2 needs example inputs", remedy="pass --input-shape")
    check_destination(dst, force=force)
    example = examples if examples is not None else example_tensors(inputs, seed=0)
    module.eval()
    call = Call(inputs, example, keywords, None)
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = call.shapes([{0: batch} if len(spec.shape) else None for spec in inputs])
    try:
        with quiet():
            program = torch.export.export(
                module, call.args, kwargs=call.kwargs, dynamic_shapes=shapes, strict=False
            )
    except Exception as exc:  # torch.export fails in many model-specific ways
        raise UnsupportedError(
            None,
            f"torch.export failed: {_cause(exc)}",
            remedy="export with a batch of 2 or more, or pass --static-batch"
            if dynamic_batch
            else None,
        ) from None
    with atomic_output(dst, force=force, fsync=fsync) as tmp:
        with quiet(), open(tmp, "wb") as fh:
            torch.export.save(program, fh, extra_files=dict(metadata or {}) or None)
        with open_source(tmp) as written:  # nnconv reads what it wrote, before the rename
            nbytes = written.checkpoint().nbytes
            found = written.adapter.program(written.file)  # type: ignore[attr-defined]
        opset_version = found.get("opset_version", {}).get("aten", 0)
    return ExportResult(
        path=str(dst),
        exporter=EXPORTER,
        fallback_reason=None,
        opset=opset_version if type(opset_version) is int else 0,
        optimized=False,
        external_data=None,
        parameters_bytes=nbytes,
    )


@dataclass
class Pt2Runner:
    """``torch.export.load(path).module()`` (made with trust only: see the module
    docstring), called as the original module was; moved to each device on first use."""

    path: str
    specs: list[InputSpec] | None = None
    notes: list[str] = field(default_factory=list)
    loaded: dict[str, Any] = field(default_factory=dict, repr=False)
    is_torch: ClassVar[bool] = False  # a program, not an nn.Module: no hooks, no float64 pass
    runtime: ClassVar[str] = EXPORTER
    label: ClassVar[str] = "torch.export (.pt2)"

    def input_specs(self) -> list[InputSpec] | None:
        return list(self.specs) if self.specs else None

    def program_module(self, device: str = "cpu") -> Any:
        """The program's module on ``device``, loaded once."""
        if "cpu" not in self.loaded:
            import torch

            try:
                with quiet(), open(self.path, "rb") as fh:
                    self.loaded["cpu"] = torch.export.load(fh).module()
            except Exception as exc:
                raise UnsupportedError(
                    self.path, f"torch.export.load cannot load the program: {_cause(exc)}"
                ) from None
        if device not in self.loaded:
            try:
                self.loaded[device] = copy.deepcopy(self.loaded["cpu"]).to(device)
            except Exception as exc:
                raise UnsupportedError(
                    self.path, f"the program cannot move to {device}: {_cause(exc)}"
                ) from None
        return self.loaded[device]

    def run(self, inputs: Any, *, device: str = "cpu") -> dict[str, torch.Tensor]:
        from .runner import call_module

        return call_module(self.program_module(device), inputs, device, self.path, self.label)


def pt2_runner(source: Any, *, trust_code: bool = False) -> Pt2Runner:
    """A runner for a ``.pt2`` (a path or an opened ``Source``): refused without
    ``trust_code``; its inputs from nnconv's record in the file, else from the program."""
    path = str(getattr(source, "file", source))
    if not trust_code:
        raise trust.refuse(
            path,
            "running a .pt2 program loads it with torch.export.load, which runs code the "
            "file chooses (its shape expressions and guard code, pickled sample inputs)",
        )
    with contextlib.ExitStack() as stack:
        if not isinstance(source, Source):
            source = stack.enter_context(open_source(source))
        metadata = dict(source.checkpoint().metadata)
        return Pt2Runner(path, _recorded(metadata) or _program_inputs(source))


def _recorded(metadata: dict[str, str]) -> list[InputSpec] | None:
    """The inputs nnconv's architecture record lists (with value ranges for indices)."""
    try:
        return [InputSpec.from_json(s) for s in json.loads(metadata[ARCHITECTURE_KEY])["inputs"]]
    except (KeyError, ValueError, TypeError):
        return None


def _program_inputs(source: Source) -> list[InputSpec] | None:
    found = source.adapter.declared_inputs(source.file)  # type: ignore[attr-defined]
    return [InputSpec(name, shape, dtype) for name, shape, dtype in found] if found else None
