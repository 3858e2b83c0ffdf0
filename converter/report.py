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

# TensorCheck.status values.  "identical" and "close" pass; "transformed" (an optimised
# export changed the values on purpose) and "cast" (a recorded --dtype cast, compared at
# that precision) pass when within tolerance and are labelled as such; the rest fail.
STATUSES = (
    "identical",
    "close",
    "cast",
    "transformed",
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

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.candidates)

    def __bool__(self) -> bool:
        return self.passed

    def to_json(self) -> dict[str, Any]:
        """The documented, stable schema (docs/verify.schema.json). Non-finite numbers
        become null: strict JSON parsers (jq, JavaScript) reject NaN and Infinity."""
        return _finite(
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
                    }
                    for c in self.candidates
                ],
            }
        )

    def render(self) -> str:
        """The table ``nnconv verify`` prints: PASS/FAIL lines with numbers, then a verdict."""
        lines = [
            f"reference  {self.reference} ({self.reference_format})"
            + (f", runs with {self.reference_runner}" if self.reference_runner else ""),
            f"seed {self.seed}, devices {', '.join(self.devices)}"
            + (", --trust-code: the files may run code" if self.trust_code else ""),
        ]
        for cand in self.candidates:
            lines += ["", *_render_candidate(cand)]
        lines += ["", *self.notes]
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


def _render_candidate(cand: CandidateReport) -> list[str]:
    lines = [
        f"candidate  {cand.path} ({cand.format})"
        + (f", runs with {cand.runner}" if cand.runner else "")
    ]
    counts: dict[str, int] = {}
    for check in cand.parameters:
        counts[check.status] = counts.get(check.status, 0) + 1
        if check.status == "identical":
            continue
        verdict = "PASS" if check.passed else "FAIL"
        where = check.candidate_name if check.name == "" else check.name
        detail = check.status
        if check.note:
            detail += f": {check.note}"
        elif check.max_abs is not None:
            detail += (
                f": {check.differing} elements differ, max_abs {_g(check.max_abs)}, "
                f"max_rel {_g(check.max_rel)} at {check.worst_index}"
            )
        if check.shape != check.candidate_shape and check.candidate_shape is not None:
            detail += f": {check.shape} vs {check.candidate_shape}"
        if check.dtype != check.candidate_dtype and check.candidate_dtype is not None:
            detail += f": {check.dtype} vs {check.candidate_dtype}"
        if check.how != "name" and check.candidate_name:
            detail += f" (matched {check.how}: {check.candidate_name})"
        lines.append(f"  {verdict}  param  {where}  {detail}")
    if cand.parameters:
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        verdict = "PASS" if all(c.passed for c in cand.parameters) else "FAIL"
        lines.append(f"  {verdict}  parameters  {len(cand.parameters)} compared: {summary}")
    for text in cand.tied:
        lines.append(f"  FAIL  tied  {text}")
    for out in cand.outputs:
        verdict = "PASS" if out.passed else "FAIL"
        if out.note and out.shape == []:
            lines.append(f"  {verdict}  output {out.name} [{out.device}]  {out.note}")
            continue
        lines.append(
            f"  {verdict}  output {out.name} [{out.device}]  max_abs {_g(out.max_abs)} "
            f"max_rel {_g(out.max_rel)} mean_abs {_g(out.mean_abs)} "
            f"out_of_tol {out.fraction_out:.2%} cos {out.cosine:.6f} "
            f"worst {out.worst_index} ({_g(out.reference_value)} vs {_g(out.candidate_value)}) "
            f"atol {_g(out.atol)} rtol {_g(out.rtol)}; passes at atol >= {_g(out.needed_atol)}"
            + (f"; {out.note}" if out.note else "")
        )
    if cand.first_divergence:
        lines.append(f"  first diverging module: {cand.first_divergence}")
    if not cand.outputs_checked:
        lines.append("  outputs NOT checked")
        if any(c.status == "transformed" for c in cand.parameters):
            lines.append("  FAIL  transformed parameters need an output comparison (--model)")
    lines += [f"  note: {n}" for n in cand.notes]
    return lines


def _verdict(report: VerifyReport) -> str:
    failed = [c.path for c in report.candidates if not c.passed]
    scope = "parameters and outputs" if report.outputs_checked else "parameters only"
    if failed:
        return f"FAILED ({scope}): {', '.join(failed)}"
    return f"PASSED ({scope}): {len(report.candidates)} checked"
