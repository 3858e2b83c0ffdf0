"""``verify``: prove that model files are the same model, and fail closed.

Parameters are aligned and compared tensor by tensor (bit-identity by default);
every side that can be made runnable (``--model``, an architecture record, a
whole-module or TorchScript file, an ONNX graph) is run on the same seeded
inputs on each requested device and every output leaf is compared with
per-dtype tolerances.  When no side can run, the report says so and its
``outputs_checked`` is False: it never pretends outputs were compared.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnconv.formats.errors import UnsafePickleError, UntrustedCodeError, UsageError
from nnconv.formats.source import Source, open_source

from . import golden as golden_io
from . import models, noise, past, quantization
from .compare import compare_outputs
from .convert import weights
from .inputs import ExampleInputs, InputSpec, Shapes, by_name, named_specs, shape_list
from .noise import Judge, Yardstick
from .outputs import compare, cross_device, first_differing, run_candidate, yardstick
from .report import CandidateReport, VerifyReport
from .runner import Runner, devices_for, make_runner, resolve_inputs
from .tolerances import ToleranceArg, parse_tolerances

if TYPE_CHECKING:
    import torch
    from torch import nn

PathLike = str | os.PathLike[str]
Progress = Callable[[str], None]


def verify(
    reference: PathLike,
    *candidates: PathLike,
    model: str | type[nn.Module] | nn.Module | None = None,
    model_args: str | Mapping[str, Any] | None = None,
    key: str | None = None,
    input_shapes: Shapes = (),
    input_dtype: str | None = None,
    named_inputs: Sequence[str] = (),
    inputs_file: PathLike | None = None,
    example_inputs: ExampleInputs | None = None,
    device: str = "cpu",
    atol: ToleranceArg = (),
    rtol: ToleranceArg = (),
    params_only: bool = False,
    outputs_only: bool = False,
    strict: bool = False,
    seed: int = 0,
    trust_code: bool = False,
    save_golden: PathLike | None = None,
    golden: PathLike | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> VerifyReport:
    """Compare ``candidates`` with ``reference``; the report is truthy when all passed.

    With no candidate, ``reference`` is checked on its own (CI compatibility
    mode): it must load strictly into its model and give finite outputs.
    ``model`` is a spec string (``"net.py:Net"``), an ``nn.Module`` class (called
    with ``model_args``) or an instance; ``input_shapes`` strings (``"2,20"``) or
    tuples; ``example_inputs`` a tensor, a tuple of them or a dict by input name
    (instead of seeded random inputs); ``named_inputs`` ``"NAME=SHAPE[:DTYPE]"`` strings,
    passed by keyword (``--input``); ``atol``/``rtol`` a float, ``"NAME:X"``
    strings or a dict by output or parameter name.  ``save_golden`` stores the
    inputs and the reference's outputs; ``golden`` replays stored inputs and
    compares ``reference``'s outputs with the stored ones.  Outputs are judged by the
    noise rule (:mod:`.noise`) unless tolerances are given or the candidate was cast;
    ``strict`` fails outputs that prove nothing (all zero, constant, tiny).
    """
    say = progress or (lambda message: None)
    if params_only and outputs_only:
        raise UsageError(None, "--params-only and --outputs-only exclude each other")
    if example_inputs is not None and inputs_file is not None:
        raise UsageError(None, "example_inputs and --inputs exclude each other")
    inputs_file = example_inputs if example_inputs is not None else inputs_file
    input_shapes = shape_list(input_shapes)
    tolerances = parse_tolerances(atol, rtol)
    spec = models.model_spec(model, model_args)
    devices = devices_for(device)
    with contextlib.ExitStack() as stack:  # each path detected and classified once
        sources = [
            stack.enter_context(open_source(path, trust_code=trust_code))
            for path in (reference, *candidates)
        ]
        return _verify(
            sources, spec, key, input_shapes, input_dtype, named_inputs, inputs_file,
            example_inputs, devices, tolerances, params_only, outputs_only, strict, seed,
            save_golden, golden, force, say,
        )  # fmt: skip


def _verify(
    sources: list[Source],
    spec: models.ModelSpec | None,
    key: str | None,
    input_shapes: list[Any],
    input_dtype: str | None,
    named_inputs: Sequence[str],
    inputs_file: Any,
    example_inputs: ExampleInputs | None,
    devices: list[str],
    tolerances: Any,
    params_only: bool,
    outputs_only: bool,
    strict: bool,
    seed: int,
    save_golden: PathLike | None,
    golden: PathLike | None,
    force: bool,
    say: Progress,
) -> VerifyReport:
    reference, candidates = sources[0], sources[1:]
    trust_code = reference.trust_code
    report = VerifyReport(
        reference=str(reference.path),
        reference_format=reference.format,
        candidates=[],
        seed=seed,
        devices=devices,
        versions=_versions(),
        outputs_checked=False,
        trust_code=trust_code,
    )
    if golden is not None:
        judge = Judge(tolerances, strict=strict)
        return _replay(report, Path(golden), reference, spec, key, trust_code, judge, say)
    build = past.matching(  # transformers runners take a with-past export's inputs
        functools.partial(_runner, spec=spec, key=key, trust_code=trust_code), sources
    )
    ref_runner = None if params_only else build(reference, notes=report.notes)
    report.reference_runner = ref_runner.label if ref_runner else None
    if not candidates:
        return _self_check(
            report,
            ref_runner,
            input_shapes,
            input_dtype,
            inputs_file,
            named_specs(named_inputs),
            Judge(tolerances, strict=strict),
            save_golden,
            force,
            say,
        )
    for source in candidates:  # parameters: one candidate's checkpoint open at a time
        cand = CandidateReport(path=str(source.path), format=source.format)
        if not outputs_only:
            say(f"comparing parameters: {reference.path} vs {source.path}")
            cand.parameters, cand.tied = quantization.compare_parameters(  # GGUF: by error
                weights(reference), weights(source), tolerances=tolerances, report=cand
            )
            source.close()  # its checkpoint goes; what the file is stays known
            cand.first_divergence = first_differing(cand)
        report.candidates.append(cand)
    reference.close()
    if params_only:
        report.notes.append("outputs not checked: --params-only")
        return report
    if ref_runner is None:
        if not any(n.startswith(f"{reference.path}: ") for n in report.notes):
            report.notes.append(
                f"outputs not checked: {reference.path} holds weights only and no model describes "
                "it (pass --model path.py:Class)"
            )
        return report
    declaring = [ref_runner]
    if not (input_shapes or inputs_file is not None or ref_runner.input_specs()):
        declaring += _declaring_runner(candidates, build)  # an ONNX graph's inputs
    specs, tensors = resolve_inputs(
        declaring,
        shapes=input_shapes,
        dtype=input_dtype,
        inputs_file=inputs_file,
        seed=seed,
        notes=report.notes,
        named=named_specs(named_inputs),
    )
    feed: Any = tensors  # by keyword, and to onnxruntime by name, when the inputs are named
    if named_inputs or isinstance(example_inputs, Mapping):
        feed = by_name(specs, tensors)
    del declaring[1:]
    _, ref_outs, yards, _ = _reference_runs(report, ref_runner, feed, devices, say)
    judge = Judge(tolerances, strict=strict)
    if save_golden is not None:
        _save_golden(report, save_golden, specs, tensors, ref_outs[devices[0]], force)
    plain: _Side | None = None  # the reference without the past, for plain exports
    for source, cand in zip(candidates, report.candidates, strict=True):
        runner = build(source, notes=report.notes)  # one candidate's model at a time
        side: _Side = (ref_runner, ref_outs, yards, feed)
        if past.takes_no_past(runner, ref_runner):  # a plain export beside a with-past one
            plain = plain or _reference_runs(
                report, *past.without_past(ref_runner, feed), devices, say
            )
            side = plain
            cand.notes.append(past.PLAIN_NOTE)
        run_candidate(cand, runner, *side, judge, say)
        del runner
        source.close()
        gc.collect()  # its model goes now, not when a cycle collection happens to run
    if len(devices) > 1:
        cross_device(report, ref_runner, ref_outs, judge)
    report.outputs_checked = any(c.outputs_checked for c in report.candidates)
    return report


# what a candidate is run against: the reference runner, its outputs and float64
# yardstick by device, and the inputs they were run on
_Side = tuple[Runner, dict[str, dict[str, "torch.Tensor"]], dict[str, Yardstick | None], Any]


def _reference_runs(
    report: VerifyReport, runner: Runner, feed: Any, devices: list[str], say: Progress
) -> _Side:
    """The reference's outputs and noise yardstick on every device, with what made them."""
    outs: dict[str, dict[str, torch.Tensor]] = {}
    yards: dict[str, Yardstick | None] = {}
    for dev in devices:
        say(f"running {report.reference} on {dev}")
        outs[dev] = runner.run(feed, device=dev)
        yards[dev] = yardstick(report, runner, feed, outs[dev], dev, say)
    return runner, outs, yards, feed


def _declaring_runner(
    candidates: list[Source], build: Callable[..., Runner | None]
) -> list[Runner]:
    """The first candidate that declares its inputs, when the reference does not."""
    for path in candidates:
        runner = build(path, notes=[])
        if runner is not None and runner.input_specs():
            return [runner]
    return []


def _save_golden(
    report: VerifyReport,
    path: PathLike,
    specs: list[InputSpec],
    tensors: list[torch.Tensor] | dict[str, torch.Tensor],
    outputs: dict[str, torch.Tensor],
    force: bool,
) -> None:
    golden_io.save_golden(
        path,
        specs,
        list(tensors.values()) if isinstance(tensors, Mapping) else tensors,
        outputs,
        force=force,
        metadata={"seed": report.seed, "versions": report.versions},
    )
    if isinstance(tensors, Mapping):
        tensors = list(tensors.values())
    report.golden_written = (
        f"{path}: {len(specs)} input(s) and {len(outputs)} output(s) of {report.reference}"
    )


def _runner(
    path: Source,
    *,
    spec: models.ModelSpec | None,
    key: str | None,
    trust_code: bool,
    notes: list[str],
) -> Runner | None:
    """A runner, or None; a record naming classes not importable here only costs the outputs
    (the user asked for no model), while a bad ``--model`` is an error."""
    try:
        return make_runner(path, spec=spec, key=key, trust_code=trust_code)
    except UnsafePickleError:
        raise  # the file cannot even be read without trust
    except UntrustedCodeError as exc:  # parameters only, saying what was not trusted
        notes.append(f"{path.path}: outputs not run: {exc.problem} (pass --trust-code to run it)")
        return None
    except UsageError as exc:
        if spec is not None:
            raise
        notes.append(
            f"{path.path}: not runnable: {exc.problem}" + (f" ({exc.remedy})" if exc.remedy else "")
        )
        return None


def _self_check(
    report: VerifyReport,
    runner: Runner | None,
    shapes: list[Any],
    dtype: str | None,
    inputs_file: Any,
    named: list[InputSpec],
    judge: Judge,
    save_golden: PathLike | None,
    force: bool,
    say: Progress,
) -> VerifyReport:
    """One file: it loads strictly into its model, runs, and gives finite outputs."""
    report.mode = "self-check"
    cand = CandidateReport(path=report.reference, format=report.reference_format)
    report.candidates.append(cand)
    if runner is None:
        said = [n.partition(": ")[2] for n in report.notes if n.startswith(f"{report.reference}: ")]
        if said:  # it describes a model that could not be built: say why, not "weights only"
            raise UsageError(report.reference, said[0])
        raise UsageError(
            report.reference,
            "nothing to verify: one weights-only file and no model",
            remedy="pass a candidate file, or --model path.py:Class",
        )
    cand.runner = runner.label
    specs, tensors = resolve_inputs(
        [runner],
        shapes=list(shapes),
        dtype=dtype,
        inputs_file=inputs_file,
        seed=report.seed,
        notes=cand.notes,
        named=named,
    )
    feed: Any = by_name(specs, tensors) if named else tensors
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for dev in report.devices:
        say(f"running {report.reference} on {dev}")
        outputs[dev] = out = runner.run(feed, device=dev)
        for name, value in out.items():
            check = compare_outputs(name, value, value, tolerances=judge.tolerances, device=dev)
            check.passed = check.finite
            check.note = "finite" if check.finite else "non-finite values (NaN or inf)"
            judge.flag(check, value, noise.parameter_scale(runner))
            cand.outputs.append(check)
    if save_golden is not None:
        _save_golden(report, save_golden, specs, tensors, outputs[report.devices[0]], force)
    cand.outputs_checked = report.outputs_checked = True
    shown = ", ".join(f"{s.name} {'×'.join(map(str, s.shape))} {s.dtype}" for s in specs)
    cand.notes.append(f"loads strictly and runs on {shown}")
    return report


def _replay(
    report: VerifyReport,
    golden_path: Path,
    path: Source,
    spec: models.ModelSpec | None,
    key: str | None,
    trust_code: bool,
    judge: Judge,
    say: Progress,
) -> VerifyReport:
    """Replay a golden file's inputs on ``path`` and compare with its stored outputs."""
    stored = golden_io.load_golden(golden_path)
    runner = make_runner(path, spec=spec, key=key, trust_code=trust_code)
    if runner is None:
        raise UsageError(
            path.path,
            "cannot run this file to replay the golden inputs",
            remedy="pass --model path.py:Class",
        )
    report.mode = "golden"
    report.reference, report.reference_format = str(golden_path), "golden"
    report.reference_runner = None
    cand = CandidateReport(
        path=str(path.path), format=path.format, runner=runner.label, outputs_checked=True
    )
    for dev in report.devices:
        say(f"replaying {golden_path} on {path.path} ({dev})")
        cand.outputs += compare(
            stored.outputs, runner.run(stored.tensors, device=dev), judge, dev, cand
        )
    report.candidates.append(cand)
    report.outputs_checked = True
    return report


def _versions() -> dict[str, str]:
    from importlib import metadata as importlib_metadata  # ~20 ms: only when verifying

    out = {}
    for dist in ("nnconv", "torch", "onnx", "onnxruntime", "safetensors", "h5py"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
