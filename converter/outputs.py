"""Forward outputs for ``verify``: one candidate run against the reference's outputs.

The reference runs once per device (and once more in float64, the noise rule's
yardstick: :mod:`.noise`); each candidate is then built, run on every device, judged
leaf by leaf and released, so that memory holds the reference's model and one
candidate's whatever the number of candidates.  Where any parameter differs, the
first diverging module is named: from forward hooks when both sides run in torch,
else from the first differing parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nnconv.formats.keys import CAST_KEY

from . import noise
from .convert import load
from .noise import Judge, Yardstick
from .report import CandidateReport, OutputCheck, VerifyReport
from .runner import Feed, Runner, align_outputs, capture_modules, first_divergence

if TYPE_CHECKING:
    import torch

Outputs = dict[str, "torch.Tensor"]
Say = Callable[[str], None]


def run_candidate(
    cand: CandidateReport,
    runner: Runner | None,
    ref_runner: Runner,
    ref_outs: dict[str, Outputs],
    yards: dict[str, Yardstick | None],
    tensors: Feed,
    judge: Judge,
    say: Say,
) -> None:
    """Run one candidate on every device and compare with the reference's outputs; outputs
    of a candidate whose parameters were cast are held to that dtype's tolerances."""
    if runner is None:
        cand.notes.append("outputs not checked: no model for this file")
        return
    cand.runner = runner.label
    cast = next((c.candidate_dtype for c in cand.parameters if c.status == "cast"), None)
    if not cand.parameters:  # --outputs-only: the file's record says, not a comparison
        cast = _recorded_cast(cand.path)
    if cast:
        judge = judge.at_precision(cast)
        cand.notes.append(
            f"its parameters were cast to {cast}: outputs are held to {cast} tolerances "
            "where those are looser"
        )
    for dev, ref_out in ref_outs.items():
        say(f"running {cand.path} on {dev}")
        out = runner.run(tensors, device=dev)
        cand.outputs += compare(ref_out, out, judge, dev, cand, yards.get(dev))
        cand.outputs_checked = True
    cand.notes += [n for n in getattr(runner, "notes", []) if n not in cand.notes]
    differs = not all(o.passed for o in cand.outputs) or any(
        c.status == "different" for c in cand.parameters
    )
    if differs and ref_runner.is_torch and runner.is_torch:
        dev = next(iter(ref_outs))
        found = _divergence(ref_runner, runner, tensors, dev, judge)
        cand.first_divergence = found or cand.first_divergence


def first_differing(cand: CandidateReport) -> str | None:
    """The module of the first parameter that differs (the state_dict's order is the
    modules' definition order); hooks refine it when both sides run in torch."""
    bad = next((c for c in cand.parameters if c.name and c.status == "different"), None)
    if bad is None:
        return None
    module = bad.name.rpartition(".")[0]
    return f"{module or '(the root module)'} (its parameter {bad.name} differs)"


def yardstick(
    report: VerifyReport,
    ref_runner: Runner,
    tensors: Feed,
    ref_out: Outputs,
    device: str,
    say: Say,
) -> Yardstick | None:
    """The float64 run the noise rule measures against; None (said once) when impossible."""
    if not ref_runner.is_torch:
        return None
    say(f"running {report.reference} in float64 on {device} (the noise yardstick)")
    found = noise.yardstick(ref_runner, tensors, ref_out, device=device)
    if isinstance(found, str):
        note = f"outputs judged by tolerances, not the noise rule: {found}"
        if note not in report.notes:
            report.notes.append(note)
        return None
    return found


def compare(
    ref_out: Outputs,
    cand_out: Outputs,
    judge: Judge,
    device: str,
    cand: CandidateReport,
    yard: Yardstick | None = None,
) -> list[OutputCheck]:
    """Every output leaf the two sides share, judged; leaves of one side only are noted
    and fail as one ``(output count)`` line."""
    pairs, unmatched_ref, unmatched_cand = align_outputs(ref_out, cand_out)
    checks = [judge(name, a, b, device, yard) for name, a, b in pairs]
    for name in unmatched_ref:
        cand.notes.append(f"output {name} of the reference has no counterpart")
    for name in unmatched_cand:
        cand.notes.append(f"output {name} of the candidate has no counterpart")
    if unmatched_ref or unmatched_cand:
        checks.append(_missing_output(device, len(ref_out), len(cand_out)))
    return checks


def cross_device(
    report: VerifyReport, ref_runner: Runner, ref_outs: dict[str, Outputs], judge: Judge
) -> None:
    """CPU against CUDA for the reference itself: kernels may differ, tolerances decide."""
    first, *others = ref_outs
    for dev in others:
        cross = CandidateReport(
            path=report.reference,
            format=report.reference_format,
            runner=ref_runner.label,
            outputs_checked=True,
        )
        cross.outputs = compare(ref_outs[first], ref_outs[dev], judge, f"{first} vs {dev}", cross)
        cross.notes.append(f"the reference on {first} against itself on {dev}")
        report.candidates.append(cross)


def _recorded_cast(path: str) -> str | None:
    """The dtype ``convert --dtype`` recorded in the file (parameters were not compared)."""
    with load(path) as ckpt:
        return ckpt.metadata.get(CAST_KEY)


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


def _divergence(
    ref_runner: Runner, runner: Runner, tensors: Feed, device: str, judge: Judge
) -> str | None:
    ref_trace = capture_modules(ref_runner, tensors, device=device)
    cand_trace = capture_modules(runner, tensors, device=device)
    dtype = ref_trace[0][1].dtype if ref_trace else "float32"
    atol, rtol = judge.tolerances.for_output("", dtype)
    return first_divergence(ref_trace, cand_trace, atol=atol, rtol=rtol)
