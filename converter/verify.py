"""``verify``: prove that model files are the same model, and fail closed.

Parameters are aligned and compared tensor by tensor (bit-identity by default);
every side that can be made runnable (``--model``, an architecture record, a
whole-module or TorchScript file, an ONNX graph) is run on the same seeded
inputs on each requested device and every output leaf is compared with
per-dtype tolerances.  When no side can run, the report says so and its
``outputs_checked`` is False: it never pretends outputs were compared.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from nnconv.formats import registry
from nnconv.formats.errors import UnsafePickleError, UntrustedCodeError, UsageError

from . import golden as golden_io
from . import models
from .compare import Tolerances, compare_outputs, compare_parameters, parse_tolerances
from .convert import load
from .report import CandidateReport, OutputCheck, VerifyReport
from .runner import (
    align_outputs,
    capture_modules,
    devices_for,
    first_divergence,
    make_runner,
    resolve_inputs,
)

PathLike = str | os.PathLike[str]
Progress = Callable[[str], None]


def verify(
    reference: PathLike,
    *candidates: PathLike,
    model: str | None = None,
    model_args: str | None = None,
    key: str | None = None,
    input_shapes: list[str] | tuple[str, ...] = (),
    input_dtype: str | None = None,
    inputs_file: PathLike | None = None,
    device: str = "cpu",
    atol: list[str] | tuple[str, ...] = (),
    rtol: list[str] | tuple[str, ...] = (),
    params_only: bool = False,
    outputs_only: bool = False,
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
    ``save_golden`` stores the inputs and the reference's outputs;
    ``golden`` replays stored inputs and compares ``reference``'s outputs with
    the stored ones.  ``atol``/``rtol`` take ``X`` or ``NAME:X`` values.
    """
    say = progress or (lambda message: None)
    if params_only and outputs_only:
        raise UsageError(None, "--params-only and --outputs-only exclude each other")
    tolerances = parse_tolerances(list(atol), list(rtol))
    spec = models.parse_spec(model, model_args) if model else None
    devices = devices_for(device)
    ref_format = registry.detect(reference).NAME
    report = VerifyReport(
        reference=str(reference),
        reference_format=ref_format,
        candidates=[],
        seed=seed,
        devices=devices,
        versions=_versions(),
        outputs_checked=False,
        trust_code=trust_code,
    )
    if golden is not None:
        return _replay(report, Path(golden), reference, spec, key, trust_code, tolerances, say)
    runner_args = dict(spec=spec, key=key, trust_code=trust_code, notes=report.notes)
    ref_runner = None if params_only else _runner(reference, **runner_args)
    report.reference_runner = ref_runner.label if ref_runner else None
    if not candidates:
        return _self_check(
            report,
            ref_runner,
            input_shapes,
            input_dtype,
            inputs_file,
            tolerances,
            save_golden,
            force,
            say,
        )
    cand_runners = [None if params_only else _runner(c, **runner_args) for c in candidates]
    for path, runner in zip(candidates, cand_runners, strict=True):
        cand = CandidateReport(path=str(path), format=registry.detect(path).NAME)
        cand.runner = runner.label if runner else None
        if not outputs_only:
            say(f"comparing parameters: {reference} vs {path}")
            with (
                load(reference, trust_code=trust_code) as ref_ckpt,
                load(path, trust_code=trust_code) as cand_ckpt,
            ):
                cand.parameters, cand.tied = compare_parameters(
                    ref_ckpt, cand_ckpt, tolerances=tolerances
                )
        report.candidates.append(cand)
    if params_only:
        report.notes.append("outputs not checked: --params-only")
        return report
    if ref_runner is None:
        if not any(n.startswith(f"{reference}: ") for n in report.notes):
            report.notes.append(
                f"outputs not checked: {reference} holds weights only and no model describes "
                "it (pass --model path.py:Class)"
            )
        return report
    specs, tensors = resolve_inputs(
        [ref_runner, *[r for r in cand_runners if r]],
        shapes=list(input_shapes),
        dtype=input_dtype,
        inputs_file=inputs_file,
        seed=seed,
    )
    for dev in devices:
        say(f"running {reference} on {dev}")
        ref_out = ref_runner.run(tensors, device=dev)
        if save_golden is not None and dev == devices[0]:
            golden_io.save_golden(
                save_golden,
                specs,
                tensors,
                ref_out,
                force=force,
                metadata={"seed": seed, "versions": report.versions},
            )
        for cand, runner in zip(report.candidates, cand_runners, strict=True):
            if runner is None:
                cand.notes.append("outputs not checked: no model for this file")
                continue
            say(f"running {cand.path} on {dev}")
            cand_out = runner.run(tensors, device=dev)
            cand.outputs += _compare(ref_out, cand_out, tolerances, dev, cand)
            cand.outputs_checked = True
            cand.notes += [n for n in getattr(runner, "notes", []) if n not in cand.notes]
            if not all(o.passed for o in cand.outputs) and ref_runner.is_torch and runner.is_torch:
                cand.first_divergence = _divergence(ref_runner, runner, tensors, dev, tolerances)
    if len(devices) > 1:
        _cross_device(report, ref_runner, tensors, devices, tolerances)
    report.outputs_checked = any(c.outputs_checked for c in report.candidates)
    return report


def _runner(path, *, spec, key, trust_code, notes: list[str]):
    """A runner, or None; a record naming classes not importable here only costs the outputs
    (the user asked for no model), while a bad ``--model`` is an error."""
    try:
        return make_runner(path, spec=spec, key=key, trust_code=trust_code)
    except UnsafePickleError:
        raise  # the file cannot even be read without trust
    except UntrustedCodeError as exc:  # parameters only, saying what was not trusted
        notes.append(f"{path}: outputs not run: {exc.problem} (pass --trust-code to run it)")
        return None
    except UsageError as exc:
        if spec is not None:
            raise
        notes.append(
            f"{path}: not runnable: {exc.problem}" + (f" ({exc.remedy})" if exc.remedy else "")
        )
        return None


def _compare(ref_out, cand_out, tolerances: Tolerances, device: str, cand) -> list[OutputCheck]:
    pairs, unmatched_ref, unmatched_cand = align_outputs(ref_out, cand_out)
    checks = [
        compare_outputs(name, a, b, tolerances=tolerances, device=device) for name, a, b in pairs
    ]
    for name in unmatched_ref:
        cand.notes.append(f"output {name} of the reference has no counterpart")
    for name in unmatched_cand:
        cand.notes.append(f"output {name} of the candidate has no counterpart")
    if unmatched_ref or unmatched_cand:
        checks.append(_missing_output(device, len(ref_out), len(cand_out)))
    return checks


def _missing_output(device: str, n_ref: int, n_cand: int) -> OutputCheck:
    nan = float("nan")
    return OutputCheck(
        name="(output count)",
        device=device,
        passed=False,
        shape=[],
        dtype="",
        atol=0.0,
        rtol=0.0,
        max_abs=nan,
        max_rel=nan,
        mean_abs=nan,
        fraction_out=1.0,
        cosine=nan,
        worst_index=[],
        reference_value=float(n_ref),
        candidate_value=float(n_cand),
        needed_atol=nan,
        note=f"reference has {n_ref} outputs, candidate {n_cand}",
    )


def _divergence(ref_runner, runner, tensors, device: str, tolerances: Tolerances) -> str | None:
    ref_trace = capture_modules(ref_runner, tensors, device=device)
    cand_trace = capture_modules(runner, tensors, device=device)
    atol, rtol = tolerances.for_output("", ref_trace[0][1].dtype if ref_trace else "float32")
    return first_divergence(ref_trace, cand_trace, atol=atol, rtol=rtol)


def _cross_device(report, ref_runner, tensors, devices, tolerances) -> None:
    """CPU against CUDA for the reference itself: kernels may differ, tolerances decide."""
    base = ref_runner.run(tensors, device=devices[0])
    for dev in devices[1:]:
        other = ref_runner.run(tensors, device=dev)
        cross = CandidateReport(
            path=report.reference,
            format=report.reference_format,
            runner=ref_runner.label,
            outputs_checked=True,
        )
        cross.outputs = _compare(base, other, tolerances, f"{devices[0]} vs {dev}", cross)
        cross.notes.append(f"the reference on {devices[0]} against itself on {dev}")
        report.candidates.append(cross)


def _self_check(
    report, runner, shapes, dtype, inputs_file, tolerances, save_golden, force, say
) -> VerifyReport:
    """One file: it loads strictly into its model, runs, and gives finite outputs."""
    cand = CandidateReport(path=report.reference, format=report.reference_format)
    report.candidates.append(cand)
    if runner is None:
        raise UsageError(
            report.reference,
            "nothing to verify: one weights-only file and no model",
            remedy="pass a candidate file, or --model path.py:Class",
        )
    cand.runner = runner.label
    specs, tensors = resolve_inputs(
        [runner], shapes=list(shapes), dtype=dtype, inputs_file=inputs_file, seed=report.seed
    )
    for dev in report.devices:
        say(f"running {report.reference} on {dev}")
        out = runner.run(tensors, device=dev)
        for name, value in out.items():
            check = compare_outputs(name, value, value, tolerances=tolerances, device=dev)
            check.passed = check.finite
            check.note = "finite" if check.finite else "non-finite values (NaN or inf)"
            cand.outputs.append(check)
        if save_golden is not None and dev == report.devices[0]:
            golden_io.save_golden(
                save_golden,
                specs,
                tensors,
                out,
                force=force,
                metadata={"seed": report.seed, "versions": report.versions},
            )
    cand.outputs_checked = report.outputs_checked = True
    cand.notes.append("compatibility check: loads strictly, runs, outputs finite")
    return report


def _replay(report, golden_path: Path, path, spec, key, trust_code, tolerances, say):
    """Replay a golden file's inputs on ``path`` and compare with its stored outputs."""
    stored = golden_io.load_golden(golden_path)
    runner = make_runner(path, spec=spec, key=key, trust_code=trust_code)
    if runner is None:
        raise UsageError(
            path,
            "cannot run this file to replay the golden inputs",
            remedy="pass --model path.py:Class",
        )
    report.reference, report.reference_format = str(golden_path), "golden"
    report.reference_runner = "stored outputs"
    cand = CandidateReport(
        path=str(path), format=registry.detect(path).NAME, runner=runner.label, outputs_checked=True
    )
    for dev in report.devices:
        say(f"replaying {golden_path} on {path} ({dev})")
        cand.outputs += _compare(
            stored.outputs, runner.run(stored.tensors, device=dev), tolerances, dev, cand
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
