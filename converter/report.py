"""The verify report: one dataclass per check, truthy when everything passed.

The JSON form (:meth:`VerifyReport.to_json`) is a stable contract for CI,
versioned by :data:`SCHEMA`; ``render()`` gives the table ``nnconv verify``
prints, one ``PASS``/``FAIL`` line per check with its numbers, in the manner of
Polygraphy's comparator lines (the tolerance that would have passed included).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = "nnconv.verify/1"
NOISE_RATIO = 10.0  # the noise rule's limit (converter/noise.py), shown in the table

# TensorCheck.status values.  "identical" and "close" pass; "transformed" (an optimised
# export changed the values on purpose) and "cast" (a recorded --dtype cast, compared at
# that precision) pass when within tolerance and are labelled as such; "not a parameter"
# (an ONNX constant or non-persistent buffer only one side stores) passes; the rest fail.
STATUSES = (
    "identical",
    "close",
    "cast",
    "transformed",
    "not a parameter",
    "different",
    "shape",
    "dtype",
    "missing",
    "unexpected",
)


@dataclass
class TensorCheck:
    """One reference parameter against its candidate counterpart."""

    name: str  # the reference's name ("" for a candidate tensor with no reference)
    candidate_name: str | None  # None when missing from the candidate
    status: str  # one of STATUSES
    passed: bool
    how: str = "name"  # alignment: "name" | "prefix" | "mapping" | "value" | "value, transposed"
    dtype: str | None = None
    candidate_dtype: str | None = None
    shape: list[int] | None = None
    candidate_shape: list[int] | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    differing: int | None = None  # number of elements not bit-identical
    worst_index: list[int] | None = None
    note: str | None = None


@dataclass
class OutputCheck:
    """One named output leaf of one forward pass, reference against candidate."""

    name: str  # flattened leaf name: "output", "output.0", "output.logits"
    device: str  # "cpu", "cuda", or "cpu vs cuda"
    passed: bool
    shape: list[int]
    dtype: str
    atol: float
    rtol: float
    max_abs: float
    max_rel: float
    mean_abs: float
    fraction_out: float  # share of elements with |a - b| > atol + rtol * |b|
    cosine: float
    worst_index: list[int]
    reference_value: float
    candidate_value: float
    needed_atol: float  # the smallest atol that would have passed at this rtol
    finite: bool = True
    note: str | None = None
    rule: str = "tolerance"  # what decided: "tolerance" (atol/rtol) or "noise" (see noise.py)
    reference_noise: float | None = None  # noise rule: max |float32 - float64| of the reference
    noise_ratio: float | None = None  # noise rule: the candidate's error vs float64 / that
    degenerate: str | None = None  # the reference output proves nothing: "all zero", ...


@dataclass
class CandidateReport:
    """Everything checked for one candidate file."""

    path: str
    format: str
    parameters: list[TensorCheck] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)  # differences in tied-weight sharing
    outputs: list[OutputCheck] = field(default_factory=list)
    outputs_checked: bool = False
    runner: str | None = None  # how the candidate ran: "torch (spec)", "onnxruntime (CPU...)"
    first_divergence: str | None = None  # first module whose output differs, in call order
    notes: list[str] = field(default_factory=list)
    quantization: list[Any] = field(default_factory=list)  # GGUF: quantization.QuantError rows

    @property
    def passed(self) -> bool:
        # "transformed" parameters pass only because the outputs decide: they must be checked.
        unproven = any(c.status == "transformed" for c in self.parameters) and not (
            self.outputs_checked and self.outputs
        )
        return (
            not unproven
            and all(c.passed for c in self.parameters)
            and not self.tied
            and all(o.passed for o in self.outputs)
        )


@dataclass
class VerifyReport:
    """The verdict over every candidate; ``bool(report)`` is True when all passed."""

    reference: str
    reference_format: str
    candidates: list[CandidateReport]
    seed: int
    devices: list[str]
    versions: dict[str, str]
    outputs_checked: bool  # False when no side could be run: parameters only
    reference_runner: str | None = None
    notes: list[str] = field(default_factory=list)
    trust_code: bool = False  # --trust-code: the files were allowed to run code
    mode: str = "compare"  # "compare" | "self-check" (one file, CI mode) | "golden" (replay)
    golden_written: str | None = None  # what --save-golden wrote, in words

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.candidates)

    def __bool__(self) -> bool:
        return self.passed

    def to_json(self) -> dict[str, Any]:
        """The documented, stable schema (docs/verify.schema.json). Non-finite numbers
        become null: strict JSON parsers (jq, JavaScript) reject NaN and Infinity."""
        doc: dict[str, Any] = _finite(
            {
                "schema": SCHEMA,
                "passed": self.passed,
                "outputs_checked": self.outputs_checked,
                "reference": {
                    "path": self.reference,
                    "format": self.reference_format,
                    "runner": self.reference_runner,
                },
                "trust_code": self.trust_code,
                "mode": self.mode,
                "golden_written": self.golden_written,
                "seed": self.seed,
                "devices": list(self.devices),
                "versions": dict(self.versions),
                "notes": list(self.notes),
                "candidates": [
                    {
                        "path": c.path,
                        "format": c.format,
                        "passed": c.passed,
                        "runner": c.runner,
                        "outputs_checked": c.outputs_checked,
                        "first_divergence": c.first_divergence,
                        "tied": list(c.tied),
                        "notes": list(c.notes),
                        "parameters": [asdict(p) for p in c.parameters],
                        "outputs": [asdict(o) for o in c.outputs],
                        "quantization": [asdict(q) for q in c.quantization],
                    }
                    for c in self.candidates
                ],
            }
        )
        return doc

    def render(self) -> str:
        """The table ``nnconv verify`` prints: PASS/FAIL lines with numbers, then a verdict."""
        runs = f", runs with {self.reference_runner}" if self.reference_runner else ""
        head = {
            "self-check": f"checking   {self.reference} ({self.reference_format}){runs}",
            "golden": f"golden     {self.reference}: stored inputs and reference outputs",
        }.get(self.mode, f"reference  {self.reference} ({self.reference_format}){runs}")
        lines = [
            head,
            f"seed {self.seed}, devices {', '.join(self.devices)}"
            + (", --trust-code: the files may run code" if self.trust_code else ""),
        ]
        for cand in self.candidates:
            lines += ["", *_render_candidate(cand, own=self.mode == "self-check")]
        lines += ["", *self.notes]
        if self.golden_written:
            lines.append(f"golden file written: {self.golden_written}")
        lines.append(_verdict(self))
        return "\n".join(line for line in lines if line is not None)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _render_candidate(cand: CandidateReport, *, own: bool = False) -> list[str]:
    runs = f", runs with {cand.runner}" if cand.runner else ""
    lines = [] if own else [f"candidate  {cand.path} ({cand.format}){runs}"]
    counts: dict[str, int] = {}
    for check in cand.parameters:
        counts[check.status] = counts.get(check.status, 0) + 1
        if check.status != "identical" and not (cand.quantization and check.passed):
            verdict = "PASS" if check.passed else "FAIL"
            where = check.candidate_name if check.name == "" else check.name
            lines.append(f"  {verdict}  param  {where}  {_describe(check)}")
    if cand.parameters:
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        verdict = "PASS" if all(c.passed for c in cand.parameters) else "FAIL"
        lines.append(f"  {verdict}  parameters  {len(cand.parameters)} compared: {summary}")
    if cand.quantization:  # a GGUF file compared by error: the table (converter/quantization.py)
        from .quantization import render

        lines += render(cand.quantization)
    for text in cand.tied:
        lines.append(f"  FAIL  tied  {text}")
    for out in cand.outputs:
        verdict = "PASS" if out.passed else "FAIL"
        where = f"output {out.name} [{out.device}]"
        if own:
            shape = "×".join(map(str, out.shape)) or "scalar"
            lines.append(f"  {verdict}  {where}  {out.note}, {shape} {out.dtype}")
        elif out.note and out.shape == []:
            lines.append(f"  {verdict}  {where}  {out.note}")
        else:
            lines.append(
                f"  {verdict}  {where}  max_abs {_g(out.max_abs)} "
                f"max_rel {_g(out.max_rel)} mean_abs {_g(out.mean_abs)} "
                f"out_of_tol {out.fraction_out:.2%} cos {out.cosine:.6f} "
                f"worst {out.worst_index} ({_g(out.reference_value)} vs "
                f"{_g(out.candidate_value)})"
                + _decision(out)
                + (f"; {out.note}" if out.note else "")
            )
        if out.degenerate:
            lines.append(f"  WARN  {where}  {_degenerate(out)}")
    if cand.first_divergence:
        lines.append(f"  first diverging module: {cand.first_divergence}")
    if not cand.outputs_checked:
        lines.append("  outputs NOT checked")
        if any(c.status == "transformed" for c in cand.parameters):
            lines.append("  FAIL  transformed parameters need an output comparison (--model)")
        constants = sum(c.status == "not a parameter" for c in cand.parameters)
        if constants:  # taken as constants on the ONNX file's word: nothing ran to confirm it
            lines.append(
                f"  note: {constants} tensor(s) of one file only were taken as constants, "
                "not parameters, without outputs to confirm it (pass --model to run them)"
            )
    lines += [f"  note: {n}" for n in cand.notes]
    return lines


def _decision(out: OutputCheck) -> str:
    """How the line was decided: the noise rule's ratio, or the tolerances."""
    if out.rule == "noise" and out.noise_ratio is not None:
        return (
            f"; error vs float64 {_g(out.noise_ratio)}× the float32 reference's own "
            f"({_g(out.reference_noise)}), passes at <= {NOISE_RATIO:g}×"
        )
    return f" atol {_g(out.atol)} rtol {_g(out.rtol)}; passes at atol >= {_g(out.needed_atol)}"


def _degenerate(out: OutputCheck) -> str:
    return (
        f"the reference's output is {out.degenerate}: it proves little about the weights "
        "(other inputs, --inputs; --strict fails it)"
    )


_HOW = {
    "prefix": "under a wrapper prefix",
    "mapping": "through the name mapping recorded in the file",
    "value": "by value",
    "value, transposed": "by value, transposed",
}


def _describe(check: TensorCheck) -> str:
    """One parameter line as a sentence: what differs, and where it was found."""
    if check.candidate_name is None or check.name == "":
        dtype, shape = (
            (check.dtype, check.shape)
            if check.name
            else (check.candidate_dtype, check.candidate_shape)
        )
        where = "only in the candidate" if check.name == "" else "missing from the candidate"
        note = check.note or ""
        rest = note.partition(": ")[2] if note.startswith("not in the") else note
        return f"{check.status}: {where} ({dtype} {shape})" + (f"; {rest}" if rest else "")
    text = check.status
    if check.note:
        text += f": {check.note}"
    elif check.max_abs is not None:
        text += (
            f": {check.differing} elements differ, max_abs {_g(check.max_abs)}, "
            f"max_rel {_g(check.max_rel)} at {check.worst_index}"
        )
    moved = check.how.endswith("transposed")
    if check.shape != check.candidate_shape and not moved and "shape" not in (check.note or ""):
        text += f": shape {check.shape} vs {check.candidate_shape}"
    if check.dtype != check.candidate_dtype and str(check.candidate_dtype) not in (
        check.note or ""
    ):
        text += f": {check.dtype} vs {check.candidate_dtype}"
    if check.how in _HOW and check.candidate_name != check.name:
        text += f" (found in the candidate as {check.candidate_name}, {_HOW[check.how]})"
    return text


def _scope(report: VerifyReport) -> str:
    """What the verdict rests on, from what was actually compared."""
    if report.mode == "self-check":
        return "compatibility: loads strictly, runs, outputs finite"
    params = any(c.parameters for c in report.candidates)
    if params and report.outputs_checked:
        return "parameters and outputs"
    if report.outputs_checked:
        return "outputs against the golden file" if report.mode == "golden" else "outputs only"
    return "parameters only"


def _verdict(report: VerifyReport) -> str:
    failed = [c.path for c in report.candidates if not c.passed]
    if failed:
        return f"FAILED ({_scope(report)}): {', '.join(failed)}"
    if report.mode == "self-check":
        return f"PASSED ({_scope(report)}): {report.reference}"
    return f"PASSED ({_scope(report)}): {len(report.candidates)} checked"
